"""Remote upgrade (`agent:upgrade:request {version?, force?}`): decide, fetch, verify, install
side by side, self-check, health-check; roll back on any failure.

Decision (Medplum's semantics, medplum-next-waves.md §2.2; :func:`decide` is pure)
-----------------------------------------------------------------------------------
1. ``[agent] allow_remote_upgrade = false`` -> refused (``agent:error``), whatever ``force``.
2. An upgrade in progress -> refused unless ``force`` (then the running one is cancelled).
3. ``version`` must look like a version (``VERSION``); without it, the hub's ``latest``.
4. Target equal to the running version -> 200 no-op unless ``force``.
5. Target older than the running version -> refused unless ``force`` (downgrade).
Anything else is *accepted*: the agent answers 200 at once (the hub's ``$upgrade`` never hits
Medplum's timeout trap) and the work runs in the background; its outcome is the ``upgrade``
section of ``$stats`` (``state``, ``targetVersion``, ``error``), the state file and the logs.

Pipeline (states in :class:`State`; each step is bounded by a timeout)
------------------------------------------------------------------------
``fetching``: the release record from the hub (``GET /releases/{version|latest}``, agent
token), then its wheel; ``verifying``: sha256 of the bytes against the record (mismatch ->
failed); ``installing``: a side-by-side environment ``<data_dir>/versions/<version>/``
created with ``python -m venv --without-pip``, the wheel installed into it with the running
interpreter's pip (``--python <new> install --no-index --no-deps``), and the running
environment's site-packages appended through ``medagent-deps.pth`` so the dependencies are the
ones already installed and tested here (no package index is needed; a release needing a new
dependency must be installed by the site); ``self-check``: ``<new> -P -m medagent --version``
must name the target version and ``<new> -P -c "import medagent.runtime.agent"`` must succeed;
``health-check``: the new version runs ``medagent serve`` on a temporary data directory with an
embedded hub and one temporary MLLP channel (original mode, the ACK bot) on port 0, and one real
HL7 message must come back ``AA`` through its channel, its link and its hub within
``health_timeout_s``; ``staged``: the new environment is ready. Any failure -> ``rolled-back``:
the new environment is removed and the running version keeps serving (it never stopped).

``switching`` (when the agent runs under `medagent serve`, which hands the runtime an
``on_staged`` callback): the serve loop performs the switch (medagent.ops.switch): the new
version is started with the listening sockets and, after this process stopped intake and
closed its queue, the queue's lease; it runs the post-switch health check and reports
``healthy`` -> ``completed`` (the new process's status, with ``fromVersion``, ``switchedAt`` and
``intakePauseS``), or ``failed``/timeout -> this process kills it, takes everything back and
records ``rolled-back`` with the reason (:meth:`Upgrader.record_outcome`). Without an
``on_staged`` callback (a runtime embedded in another program, which cannot be replaced by a
process, and on Windows) the pipeline ends at ``staged`` (docs/operations.md says how to put a
staged version in service). After a completed switch, :func:`upgraded_python` tells a restarted
`medagent serve` which newer environment to exec.

Invariants: the running agent is never stopped by this module (the switch is the serve loop's);
the state file ``<data_dir>/upgrade.json`` is written atomically 0600; downloads are size-bounded and go to
the data directory (0700) only; the running version is never deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import re
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from medagent import __version__
from medagent.channels.base import HubClient
from medagent.hub.releases import VERSION, WHEEL_NAME, sha256_file, version_key
from medagent.storage.files import ensure_private_dir

__all__ = ["Decision", "Staged", "State", "UpgradeRefused", "Upgrader", "child_env", "decide", "health_check",
           "self_check", "upgraded_python", "venv_python"]

log = logging.getLogger("medagent.upgrade")

STATE_FILE = "upgrade.json"
VERSIONS_DIR = "versions"
MAX_WHEEL_BYTES = 200 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 300.0
INSTALL_TIMEOUT_S = 300.0
SELF_CHECK_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 90.0
_CHANNEL_LINE = re.compile(rb"channel (\S+)\s+mllp://[\d.]+:(\d+)")


class State(enum.StrEnum):
    IDLE = "idle"
    FETCHING = "fetching"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    SELF_CHECK = "self-check"
    HEALTH_CHECK = "health-check"
    STAGED = "staged"
    SWITCHING = "switching"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled-back"

    @property
    def in_progress(self) -> bool:
        return self in (State.FETCHING, State.VERIFYING, State.INSTALLING, State.SELF_CHECK, State.HEALTH_CHECK,
                        State.SWITCHING)


class UpgradeRefused(Exception):
    """The request is answered with ``agent:error`` carrying this text."""


class StepFailed(Exception):
    """A pipeline step failed; the upgrade rolls back."""


@dataclass(frozen=True, slots=True)
class Decision:
    """``noop``: answer 200 and do nothing; otherwise start the pipeline for ``target`` (None: latest)."""

    noop: bool
    target: str | None
    cancel_running: bool = False


def decide(version: str | None, force: bool, current: str, in_progress: bool, allowed: bool) -> Decision:
    """Medplum's order of checks (app.ts ``tryUpgradeAgent``), plus the site's veto."""
    if not allowed:
        raise UpgradeRefused("Remote upgrade is disabled on this agent (allow_remote_upgrade = false)")
    if in_progress and not force:
        raise UpgradeRefused("Pending upgrade is already in progress")
    if version is not None:
        if not VERSION.match(version):
            raise UpgradeRefused(f"'{version}' is not a valid version")
        if version == current and not force:
            return Decision(noop=True, target=version)
        if version_key(version) < version_key(current) and not force:
            raise UpgradeRefused(f"{version} is older than the running {current}; "
                                 "a downgrade needs force (reissue the command with force)")
    return Decision(noop=False, target=version, cancel_running=in_progress)


# -- steps -----------------------------------------------------------------------------------------
async def _run(args: list[str], timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                stdin=asyncio.subprocess.DEVNULL, env=env)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"timed out after {timeout_s:g} s"
    return proc.returncode or 0, out.decode("utf-8", "replace")


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def child_env() -> dict[str, str]:
    """The environment of the new version's processes: nothing that points at this version."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONSAFEPATH"] = "1"  # never import medagent from the working directory
    return env


async def install(wheel: Path, venv: Path) -> None:
    """A side-by-side environment with the wheel; dependencies from the running environment."""
    if venv.exists():
        shutil.rmtree(venv)
    code, out = await _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], INSTALL_TIMEOUT_S)
    if code != 0:
        raise StepFailed(f"cannot create the environment: {out.strip()[-500:]}")
    python = venv_python(venv)
    code, out = await _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--no-deps",
                            "--disable-pip-version-check", "--no-input", "-q", str(wheel)], INSTALL_TIMEOUT_S)
    if code != 0:
        raise StepFailed(f"pip could not install {wheel.name}: {out.strip()[-500:]}")
    code, site = await _run([str(python), "-P", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            SELF_CHECK_TIMEOUT_S, child_env())
    if code != 0:
        raise StepFailed(f"the new environment does not run: {site.strip()[-500:]}")
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # A plain directory line in a .pth is appended to sys.path without processing the .pth files
    # inside it, so this environment's editable/finder hooks for the old medagent stay out.
    (Path(site.strip()) / "medagent-deps.pth").write_text("\n".join(sorted(ours)) + "\n")


async def self_check(python: Path, target: str) -> None:
    code, out = await _run([str(python), "-P", "-m", "medagent", "--version"], SELF_CHECK_TIMEOUT_S, child_env())
    if code != 0:
        raise StepFailed(f"self-check: `medagent --version` failed ({code}): {out.strip()[-500:]}")
    if target not in out.split()[:3] and f"medagent {target}" not in out:
        raise StepFailed(f"self-check: the new environment reports {out.strip()[:80]!r}, not {target}")
    code, out = await _run([str(python), "-P", "-c", "import medagent.runtime.agent, medagent.cli"],
                           SELF_CHECK_TIMEOUT_S, child_env())
    if code != 0:
        raise StepFailed(f"self-check: import failed: {out.strip()[-500:]}")


_HEALTH_MESSAGE = ("MSH|^~\\&|MEDAGENT|UPGRADE|HEALTH|CHECK|20240101000000||ADT^A01^ADT_A01|HEALTH{n}|P|2.5.1\r"
                   "EVN|A01|20240101000000\r")


async def health_check(python: Path, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """One real message through the new version's channel, link and embedded hub; AA or it fails."""
    with tempfile.TemporaryDirectory(prefix="medagent-health-") as tmp:
        data = Path(tmp) / "data"
        config = Path(tmp) / "health.toml"
        config.write_text(f'[agent]\ndata_dir = "{data.as_posix()}"\nhub = "embedded"\n\n[hub]\nport = 0\n\n'
                          '[[channel]]\nname = "health"\nendpoint = "mllp://127.0.0.1:0"\n'
                          'bot = "medagent.hub.bots.ack:handler"\n')
        proc = await asyncio.create_subprocess_exec(
            str(python), "-P", "-m", "medagent", "serve", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
            env=child_env(), start_new_session=True)
        try:
            await asyncio.wait_for(_exchange(proc), timeout_s)
        except TimeoutError:
            raise StepFailed(f"health check: no AA within {timeout_s:g} s") from None
        finally:
            await _stop(proc)


async def _exchange(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    port = None
    while port is None:
        line = await proc.stdout.readline()
        if not line:
            raise StepFailed(f"health check: the new version exited ({await proc.wait()}) before serving")
        match = _CHANNEL_LINE.search(line)
        if match:
            port = int(match.group(2))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\x0b" + _HEALTH_MESSAGE.format(n=int(time.time())).encode() + b"\x1c\r")
        await writer.drain()
        ack = await reader.readuntil(b"\x1c\r")
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise StepFailed(f"health check: the channel closed without an ACK ({type(exc).__name__})") from None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    if b"MSA|AA|" not in ack:
        raise StepFailed(f"health check: the ACK was not AA ({ack[:200]!r})")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM) if sys.platform != "win32" else proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 20.0)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL) if sys.platform != "win32" else proc.kill()
        await proc.wait()


@dataclass(frozen=True, slots=True)
class Staged:
    """A version ready to be switched to: its environment and version."""

    environment: Path
    version: str

    @property
    def python(self) -> Path:
        return venv_python(self.environment)


def upgraded_python(data_dir: Path, current: str = __version__) -> Path | None:
    """The interpreter of a version this agent switched to and that is newer than ``current``.

    A service's ExecStart names the base installation; after a completed switch a restart must
    not fall back to the older version. `medagent serve` calls this at start and execs the
    upgraded version when it exists (a base installation upgraded by the site past that version
    wins: only a newer environment is used)."""
    try:
        status = json.loads((Path(data_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or status.get("state") != State.COMPLETED.value:
        return None
    target, environment = status.get("targetVersion"), status.get("environment")
    if not isinstance(target, str) or not isinstance(environment, str) or not VERSION.match(target):
        return None
    versions = (Path(data_dir) / VERSIONS_DIR).resolve()
    python = venv_python(Path(environment))
    if Path(environment).resolve().parent != versions or not python.exists():
        return None
    return python if version_key(target) > version_key(current) else None


# -- the upgrader ----------------------------------------------------------------------------------
class Upgrader:
    """One upgrade at a time; :meth:`request` answers, the pipeline runs in the background."""

    def __init__(self, hub: HubClient | None, data_dir: Path, allowed: bool = True,
                 health: Callable[[Path], Awaitable[None]] = health_check, current: str = __version__,
                 on_staged: Callable[[Staged], None] | None = None) -> None:
        self._hub = hub
        self._on_staged = on_staged
        self._data_dir = Path(data_dir)
        self.allowed = allowed
        self._health = health
        self.current = current
        self._task: asyncio.Task[None] | None = None
        self._status: dict[str, Any] = {"state": State.IDLE.value, "runningVersion": current}

    @property
    def state(self) -> State:
        return State(self._status["state"])

    def status(self) -> dict[str, Any]:
        return dict(self._status)

    def request(self, version: str | None, force: bool) -> str:
        """Decide; start the pipeline when accepted. Returns "noop" or "accepted"; raises UpgradeRefused."""
        if self.allowed and self.state is State.SWITCHING:  # past the point where cancelling helps
            raise UpgradeRefused(f"the switch to {self._status.get('targetVersion')} is in progress; ask again "
                                 "once it has completed or rolled back")
        decision = decide(version, force, self.current, self.state.in_progress, self.allowed)
        if decision.noop:
            log.info("upgrade to %s requested: already running it, nothing to do", version)
            return "noop"
        if self._task is not None and not self._task.done():
            log.warning("upgrade forced while another is in progress: cancelling it")
            self._task.cancel()
        self._task = asyncio.get_running_loop().create_task(self._pipeline(decision.target, force),
                                                            name="medagent-upgrade")
        return "accepted"

    async def wait(self) -> dict[str, Any]:
        """The final status of the running pipeline (tests and the CLI)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.status()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def record_outcome(self, state: State, **fields: Any) -> None:
        """The switch's outcome (``completed`` in the new process, ``rolled-back`` in the old one),
        written to the status, the state file and the log."""
        self._status.update(fields)
        self._set(state)
        if state is State.COMPLETED:
            log.info("upgrade from %s to %s completed (intake paused %.3f s)", fields.get("fromVersion"),
                     self.current, fields.get("intakePauseS") or 0.0)
        else:
            log.warning("upgrade to %s failed and was rolled back (still running %s): %s",
                        fields.get("targetVersion") or "?", self.current, fields.get("error"))

    def _set(self, state: State, **fields: Any) -> None:
        self._status.update(state=state.value, updated=int(time.time()), **fields)
        self._write_state()

    def _write_state(self) -> None:
        path = self._data_dir / STATE_FILE
        tmp = path.with_name(STATE_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(self._status, out)
        os.replace(tmp, path)

    async def _pipeline(self, target: str | None, force: bool) -> None:
        venv: Path | None = None
        try:
            self._set(State.FETCHING, targetVersion=target, error=None)
            record = await self._record(target or "latest")
            target = record["version"]
            self._status["targetVersion"] = target
            if not force and version_key(target) <= version_key(self.current):
                # "latest" resolved to what runs (no-op) or to an older release (a downgrade needs force)
                self._set(State.IDLE, error=None if target == self.current else f"latest release {target} is older")
                log.info("upgrade: the hub's latest release is %s, running %s: nothing to do", target, self.current)
                return
            wheel = await self._download(record)
            self._set(State.VERIFYING)
            digest = await asyncio.to_thread(sha256_file, wheel)
            if digest != record["sha256"]:
                raise StepFailed(f"sha256 mismatch: the release says {record['sha256']}, the download is {digest}")
            self._set(State.INSTALLING)
            venv = self._data_dir / VERSIONS_DIR / target
            await install(wheel, venv)
            self._set(State.SELF_CHECK)
            await self_check(venv_python(venv), target)
            self._set(State.HEALTH_CHECK)
            await self._health(venv_python(venv))
            self._set(State.STAGED, environment=str(venv))
            log.info("upgrade to %s staged in %s (self-check and health check passed)", target, venv)
            if self._on_staged is not None:
                self._set(State.SWITCHING)
                self._on_staged(Staged(venv, target))
        except asyncio.CancelledError:
            self._roll_back(venv, "cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - every failure rolls back and is reported
            reason = str(exc) or type(exc).__name__
            self._roll_back(venv, reason)

    def _roll_back(self, venv: Path | None, reason: str) -> None:
        if venv is not None and venv.exists():
            shutil.rmtree(venv, ignore_errors=True)
        self._set(State.ROLLED_BACK, error=reason)
        log.warning("upgrade to %s failed and was rolled back (still running %s): %s",
                    self._status.get("targetVersion") or "latest", self.current, reason)

    async def _fetch(self, path: str, limit: int) -> bytes:
        if self._hub is None:
            raise StepFailed("no hub to fetch releases from")
        headers = {"Authorization": await self._hub.authorization()}
        timeout = aiohttp.ClientTimeout(total=DOWNLOAD_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
                f"{self._hub.base_url}{path}", headers=headers, ssl=self._hub.ssl_context or True) as response:
            if response.status != 200:
                raise StepFailed(f"GET {path}: the hub answered {response.status}")
            if (response.content_length or 0) > limit:
                raise StepFailed(f"GET {path}: {response.content_length} bytes is over the {limit} limit")
            body = bytearray()
            async for block in response.content.iter_chunked(1 << 20):
                body += block
                if len(body) > limit:
                    raise StepFailed(f"GET {path}: over the {limit} byte limit")
            return bytes(body)

    async def _record(self, version: str) -> dict[str, Any]:
        try:
            record = json.loads(await self._fetch(f"/releases/{version}", 1 << 20))
        except (ValueError, aiohttp.ClientError) as exc:
            raise StepFailed(f"cannot read release {version} from the hub: {exc}") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("version", "filename", "sha256")):
            raise StepFailed(f"the hub's release record for {version} is incomplete")
        if not WHEEL_NAME.match(record["filename"]) or not VERSION.match(record["version"]):
            raise StepFailed(f"the hub's release record for {version} has a bad file name or version")
        return record

    async def _download(self, record: dict[str, Any]) -> Path:
        try:
            body = await self._fetch(f"/releases/{record['version']}/wheel", MAX_WHEEL_BYTES)
        except aiohttp.ClientError as exc:
            raise StepFailed(f"cannot download {record['filename']}: {exc}") from None
        downloads = self._data_dir / VERSIONS_DIR / "downloads"
        ensure_private_dir(downloads)
        path = downloads / record["filename"]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(body)
        return path
