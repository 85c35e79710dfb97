"""C-STORE throughput: modality SCUs -> medagent's dicom channel (real queue) vs pynetdicom storescp.

``python benchmarks/dicom_store.py [--seconds 5] [--associations 1,4,8]`` runs, in one sitting
and for each concurrency N:

* ``ceiling``: pynetdicom's own storage SCP in a child process, file-backed receive
  (``STORE_RECV_CHUNKED_DATASET``), each instance moved into a directory (what ``storescp``
  does: write the file, answer Success) -- no fsync, no queue;
* ``medagent``: the ``dicom://`` channel in a child process with a real DurableQueue (durability
  "normal", survives kill -9): file-backed receive, rename into the spool, SHA-256, header
  parse, DICOM JSON, queue commit, then Success. ``--fsync`` adds the channel's ``fsync=true``
  (file and directory fsync per instance, for agents running ``durability = "fsync"``).

N SCU processes (one association each, lock-step C-STOREs of a 512x512 16-bit CT, ~0.5 MB, a
fresh SOP Instance UID per store so nothing is deduplicated) run for ``--seconds``; the figures
are Success-answered instances/s and MB/s, and the ratio medagent/ceiling. Prints one table and
(``--json``) a JSON document. Both servers run on this machine beside the SCUs: compare ratios,
not absolute rates, across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROWS = COLUMNS = 512


def _ct() -> Any:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "BENCH"
    ds.PatientName = "BENCH^CT"
    ds.Modality = "CT"
    ds.StudyDate = "20240101"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(1).integers(0, 4096, (ROWS, COLUMNS), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


# --------------------------------------------------------------------------- servers (children)


def _ceiling_server(work: str, pipe: Connection) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, _config, evt

    _config.STORE_RECV_CHUNKED_DATASET = True
    target = Path(work)

    def on_store(event: Any) -> int:
        os.replace(event.dataset_path, target / f"{uuid.uuid4().hex}.dcm")
        return 0x0000

    ae = AE(ae_title="STORESCP")
    ae.maximum_associations = 16
    ae.maximum_pdu_size = 65536
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    pipe.send(server.server_address[1])
    pipe.recv()  # stop
    server.shutdown()


def _medagent_server(work: str, pipe: Connection, fsync: bool = False) -> None:
    async def main() -> None:
        from types import MappingProxyType

        from medagent.channels.base import ChannelContext
        from medagent.channels.dicom import DicomChannel, dicom_options
        from medagent.channels.endpoint import Endpoint
        from medagent.queue import DurableQueue

        class Sink:
            def __init__(self, queue: DurableQueue) -> None:
                self.queue = queue

            def accept(self, record: Any, *, durable: bool, dedup: Any, on_commit: Any) -> None:
                self.queue.submit(record, on_commit, dedup)

        data = Path(work)
        queue = DurableQueue(data / "queue.db")
        await queue.open()
        params = {"maxAssociations": "16", "fsync": "true" if fsync else "false"}
        endpoint = Endpoint("dicom", "127.0.0.1", 0, MappingProxyType(params), "dicom://127.0.0.1:0")
        channel = DicomChannel("bench", endpoint, dicom_options(endpoint), ChannelContext(Sink(queue), data))
        await channel.start()
        pipe.send(channel.port)
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
        await channel.stop()
        await queue.close()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# --------------------------------------------------------------------------- SCUs (children)


def _scu(port: int, seconds: float, out: Connection) -> None:
    from pydicom.uid import generate_uid
    from pynetdicom import AE

    ds = _ct()
    ae = AE(ae_title="MODALITY")
    ae.maximum_pdu_size = 65536
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port)
    count = failures = 0
    out.send("ready" if assoc.is_established else "failed")
    start_at = out.recv()  # every SCU has associated before the clock starts
    if assoc.is_established:
        while time.time() < start_at:
            time.sleep(0.001)
        deadline = start_at + seconds
        while time.time() < deadline:
            ds.SOPInstanceUID = generate_uid()
            status = assoc.send_c_store(ds)
            if status and int(status.Status) == 0:
                count += 1
            else:
                failures += 1
        assoc.release()
    out.send((count, failures))


def run(server: str, associations: int, seconds: float, instance_bytes: int, fsync: bool = False) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix=f"dicom-bench-{server}-") as work:
        parent, child = ctx.Pipe()
        target = _ceiling_server if server == "ceiling" else _medagent_server
        proc = ctx.Process(target=target, args=(work, child) if server == "ceiling" else (work, child, fsync))
        proc.start()
        try:
            port = parent.recv()
            pipes, scus = [], []
            for _ in range(associations):
                mine, theirs = ctx.Pipe()
                p = ctx.Process(target=_scu, args=(port, seconds, theirs))
                p.start()
                pipes.append(mine)
                scus.append(p)
            ready = [r.recv() for r in pipes]
            if "failed" in ready:
                raise RuntimeError(f"{ready.count('failed')} SCU(s) could not associate with {server}")
            start_at = time.time() + 0.2
            for r in pipes:
                r.send(start_at)
            results = [r.recv() for r in pipes]
            for p in scus:
                p.join(30)
        finally:
            parent.send("stop")
            proc.join(60)
            if proc.is_alive():
                proc.kill()
    stored = sum(c for c, _ in results)
    return {"server": server, "associations": associations, "instances": stored,
            "failures": sum(f for _, f in results), "instances_per_s": stored / seconds,
            "mb_per_s": stored * instance_bytes / seconds / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--associations", default="1,4,8")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--fsync", action="store_true", help="medagent channel with fsync=true")
    args = parser.parse_args()
    import io

    buffer = io.BytesIO()
    _ct().save_as(buffer, enforce_file_format=True)
    instance_bytes = len(buffer.getvalue())
    rows = []
    for n in (int(x) for x in args.associations.split(",")):
        ceiling = run("ceiling", n, args.seconds, instance_bytes)
        ours = run("medagent", n, args.seconds, instance_bytes, args.fsync)
        rows.append({"associations": n, "ceiling": ceiling, "medagent": ours,
                     "ratio": ours["instances_per_s"] / ceiling["instances_per_s"] if ceiling["instances_per_s"] else 0.0})
    if args.json:
        print(json.dumps({"instance_bytes": instance_bytes, "seconds": args.seconds, "rows": rows}, indent=2))
        return
    print(f"512x512 CT, {instance_bytes} bytes per instance, {args.seconds:g} s per run, {os.cpu_count()} CPUs")
    print(f"{'assocs':>6} | {'storescp inst/s':>15} {'MB/s':>7} | {'medagent inst/s':>15} {'MB/s':>7} | {'ratio':>5}")
    for row in rows:
        c, m = row["ceiling"], row["medagent"]
        print(f"{row['associations']:>6} | {c['instances_per_s']:>15.1f} {c['mb_per_s']:>7.1f} | "
              f"{m['instances_per_s']:>15.1f} {m['mb_per_s']:>7.1f} | {row['ratio']:>5.2f}")
        if c["failures"] or m["failures"]:
            print(f"         failures: storescp {c['failures']}, medagent {m['failures']}", file=sys.stderr)


if __name__ == "__main__":
    main()
