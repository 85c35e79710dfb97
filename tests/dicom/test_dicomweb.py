"""The hub's DICOMweb service against the unmodified dicomweb-client package (real HTTP)."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import aiohttp
from dicomtest import ct_dataset
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from medagent.hub import HubServer


def client(hub: HubServer, token: str | None = None) -> DICOMwebClient:
    return DICOMwebClient(f"{hub.url}/dicomweb", headers={"Authorization": f"Bearer {token or hub.admin_token}"})


async def test_store_search_retrieve_round_trip(hub: HubServer) -> None:
    study, series = generate_uid(), generate_uid()
    sent = [ct_dataset(syntax=syntax, study_uid=study, series_uid=series, seed=i, instance_number=i + 1)
            for i, syntax in enumerate((ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless))]
    other = ct_dataset(patient_id="OTHER", modality="MR", study_date="20190101")
    web = client(hub)
    answer = await asyncio.to_thread(web.store_instances, sent + [other])
    assert len(answer.ReferencedSOPSequence) == 4
    assert "FailedSOPSequence" not in answer

    studies = await asyncio.to_thread(web.search_for_studies, search_filters={"PatientID": "PAT1"})
    assert [s["0020000D"]["Value"][0] for s in studies] == [study]
    assert studies[0]["00201208"]["Value"] == [3] and studies[0]["00080061"]["Value"] == ["CT"]
    by_modality = await asyncio.to_thread(web.search_for_studies, search_filters={"ModalitiesInStudy": "MR"})
    assert [s["00100020"]["Value"][0] for s in by_modality] == ["OTHER"]
    in_range = await asyncio.to_thread(web.search_for_studies, search_filters={"StudyDate": "20240101-20241231"})
    assert [s["0020000D"]["Value"][0] for s in in_range] == [study]
    wildcard = await asyncio.to_thread(web.search_for_studies, search_filters={"PatientID": "PAT*"})
    assert len(wildcard) == 1
    assert await asyncio.to_thread(web.search_for_studies, search_filters={"StudyDate": "-20180101"}) == []

    series_found = await asyncio.to_thread(web.search_for_series, study)
    assert [s["0020000E"]["Value"][0] for s in series_found] == [series]
    instances = await asyncio.to_thread(web.search_for_instances, study, series)
    assert [i["00080018"]["Value"][0] for i in instances] == [d.SOPInstanceUID for d in sent]

    for original in sent:
        back = await asyncio.to_thread(web.retrieve_instance, study, series, original.SOPInstanceUID)
        assert back.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert back.PixelData == original.PixelData  # byte-identical, compressed one included
    whole = await asyncio.to_thread(web.retrieve_study, study)
    assert sorted(d.SOPInstanceUID for d in whole) == sorted(d.SOPInstanceUID for d in sent)
    metadata = await asyncio.to_thread(web.retrieve_series_metadata, study, series)
    assert len(metadata) == 3 and all("7FE00010" not in m for m in metadata)
    frames = await asyncio.to_thread(web.retrieve_instance_frames, study, series, sent[0].SOPInstanceUID, [1])
    assert frames == [sent[0].PixelData]
    rle_frames = await asyncio.to_thread(web.retrieve_instance_frames, study, series, sent[2].SOPInstanceUID, [1])
    assert len(rle_frames) == 1 and rle_frames[0] and rle_frames[0] != sent[0].PixelData


async def test_second_upload_of_an_instance_is_a_success_and_one_copy(hub: HubServer) -> None:
    ds = ct_dataset()
    web = client(hub)
    for _ in range(2):
        answer = await asyncio.to_thread(web.store_instances, [ds])
        assert answer.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    found = await asyncio.to_thread(web.search_for_instances, search_filters={"SOPInstanceUID": ds.SOPInstanceUID})
    assert len(found) == 1
    files = list((hub.data_dir / "dicom").rglob("*.dcm"))
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(files[0].parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((hub.data_dir / "dicom.sqlite3").stat().st_mode) == 0o600


def _multipart(parts: list[bytes], boundary: str = "b0und4ry") -> tuple[bytes, str]:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _part10(ds: Dataset, tmp_path: Path) -> bytes:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


async def test_ugly_stow_requests_are_answered(hub: HubServer, tmp_path: Path) -> None:
    good = ct_dataset()
    other_study = ct_dataset()
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    async with aiohttp.ClientSession() as http:
        # a junk part beside a good one: 202, the good one stored, the junk one failed 0xC000
        body, ctype = _multipart([b"not dicom at all", _part10(good, tmp_path)])
        async with http.post(f"{hub.url}/dicomweb/studies", data=body, headers={**headers, "Content-Type": ctype}) as r:
            assert r.status == 202
            answer = json.loads(await r.read())
            assert answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
            assert answer["00081199"]["Value"][0]["00081155"]["Value"] == [good.SOPInstanceUID]
        # an instance of another study posted to /studies/{good study}: 409 with 0xC122
        body, ctype = _multipart([_part10(other_study, tmp_path)])
        url = f"{hub.url}/dicomweb/studies/{good.StudyInstanceUID}"
        async with http.post(url, data=body, headers={**headers, "Content-Type": ctype}) as r:
            assert r.status == 409
            assert json.loads(await r.read())["00081198"]["Value"][0]["00081197"]["Value"] == [0xC122]
        # not multipart/related application/dicom: 415
        async with http.post(f"{hub.url}/dicomweb/studies", data=b"{}",
                             headers={**headers, "Content-Type": "application/json"}) as r:
            assert r.status == 415
        # no token / a bad token: 401; a bad UID in a path: 404; a bad query: 400
        async with http.get(f"{hub.url}/dicomweb/studies") as r:
            assert r.status == 401
        async with http.get(f"{hub.url}/dicomweb/studies", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with http.get(f"{hub.url}/dicomweb/studies/..%2F..%2Fetc", headers=headers) as r:
            assert r.status == 404
        async with http.get(f"{hub.url}/dicomweb/studies?StudyDate=yesterday", headers=headers) as r:
            assert r.status == 400
        async with http.get(f"{hub.url}/dicomweb/studies?NoSuchKeyword=1", headers=headers) as r:
            assert r.status == 400
        # a transfer syntax we do not hold and cannot transcode to: 406
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
        url = (f"{hub.url}/dicomweb/studies/{good.StudyInstanceUID}/series/{good.SeriesInstanceUID}"
               f"/instances/{good.SOPInstanceUID}")
        async with http.get(url, headers={**headers, "Accept": accept}) as r:
            assert r.status == 406
        async with http.get(url + "/frames/2", headers=headers) as r:
            assert r.status == 404
    assert not list((hub.data_dir / "dicom" / ".incoming").iterdir())


async def test_agent_token_is_accepted(hub: HubServer) -> None:
    credentials = await hub.store.add_agent("modality-gw")
    async with aiohttp.ClientSession() as http:
        form = {"grant_type": "client_credentials", "client_id": credentials.client_id,
                "client_secret": credentials.client_secret}
        async with http.post(f"{hub.url}/oauth2/token", data=form) as r:
            token = (await r.json())["access_token"]
    web = client(hub, token)
    ds = ct_dataset()
    await asyncio.to_thread(web.store_instances, [ds])
    assert len(await asyncio.to_thread(web.search_for_studies)) == 1


async def test_stored_instance_survives_a_hub_restart(tmp_path: Path) -> None:
    from dicomtest import hub_server

    ds = ct_dataset()
    first = hub_server(tmp_path)
    await first.start()
    try:
        await asyncio.to_thread(client(first).store_instances, [ds])
    finally:
        await first.stop()
    second = hub_server(tmp_path)
    await second.start()
    try:
        back = await asyncio.to_thread(client(second).retrieve_instance, ds.StudyInstanceUID,
                                       ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert back.PixelData == ds.PixelData
    finally:
        await second.stop()
