"""The hub's release registry: medagent wheels and their sha256, served to agents for upgrades.

Theory of operation
-------------------
``medagent hub release add WHEEL`` copies a wheel into ``<hub data>/releases/`` (directory
0700, file 0600) and records ``{version, filename, sha256, size, added}`` in
``releases/index.json`` (written atomically). The version is read from the wheel's file name
(PEP 427: ``{name}-{version}-...whl``) and must be the package's (``medagent``).

HTTP (a bearer token: an agent's access token or the admin token):

* ``GET /releases`` -> ``{"releases": [record, ...]}``, oldest first;
* ``GET /releases/latest`` and ``GET /releases/{version}`` -> one record plus ``url``;
* ``GET /releases/{version}/wheel`` -> the wheel bytes (``application/octet-stream``).

The agent trusts the sha256 from the record, fetched over the same authenticated (TLS) link,
and refuses a download whose digest differs (medagent.ops.upgrade).

Invariants: the index lists only files that are complete (copy, fsync, rename, then index);
names are checked against ``WHEEL_NAME`` before any path is built, so a request cannot leave
the releases directory.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from medagent.storage.files import ensure_private_dir

__all__ = ["ReleaseError", "ReleaseRegistry", "add_release_parser", "add_release_routes", "run_release_command"]

RELEASES_DIR = "releases"
INDEX_FILE = "index.json"
PACKAGE = "medagent"
#: PEP 427 file name; the version may carry a local part (+abc) and pre/post/dev tags.
WHEEL_NAME = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[0-9][A-Za-z0-9_.+!]*)-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+\.whl$")
VERSION = re.compile(r"^[0-9][A-Za-z0-9_.+!-]{0,63}$")
RELEASES_KEY: web.AppKey[ReleaseRegistry] = web.AppKey("medagent_releases")


class ReleaseError(ValueError):
    """A wheel that cannot be registered (message says why)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_key(version: str) -> tuple[Any, ...]:
    """Order versions by their numeric release part (1.10.0 > 1.9.0); text parts compare as text."""
    parts = re.split(r"[.+-]", version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


class ReleaseRegistry:
    def __init__(self, hub_data_dir: Path) -> None:
        self.directory = Path(hub_data_dir) / RELEASES_DIR

    def records(self) -> list[dict[str, Any]]:
        try:
            data = orjson.loads((self.directory / INDEX_FILE).read_bytes())
        except FileNotFoundError:
            return []
        return sorted(data.get("releases", []), key=lambda r: version_key(r["version"]))

    def get(self, version: str) -> dict[str, Any] | None:
        records = self.records()
        if version == "latest":
            return records[-1] if records else None
        return next((r for r in records if r["version"] == version), None)

    def wheel_path(self, record: dict[str, Any]) -> Path:
        if not WHEEL_NAME.match(record["filename"]):
            raise ReleaseError(f"bad file name in the index: {record['filename']!r}")
        return self.directory / record["filename"]

    def add(self, wheel: Path) -> dict[str, Any]:
        match = WHEEL_NAME.match(wheel.name)
        if match is None:
            raise ReleaseError(f"{wheel.name} is not a wheel file name (name-version-python-abi-platform.whl)")
        if match["name"].lower().replace("-", "_") != PACKAGE:
            raise ReleaseError(f"{wheel.name} is not a {PACKAGE} wheel")
        if not wheel.is_file():
            raise ReleaseError(f"{wheel} does not exist")
        ensure_private_dir(self.directory)
        target = self.directory / wheel.name
        partial = target.with_name(target.name + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out, open(wheel, "rb") as source:
            shutil.copyfileobj(source, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
        record = {"version": match["version"], "filename": wheel.name, "sha256": sha256_file(target),
                  "size": target.stat().st_size, "added": int(time.time())}
        records = [r for r in self.records() if r["version"] != record["version"]] + [record]
        index = self.directory / INDEX_FILE
        tmp = index.with_name(INDEX_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(orjson.dumps({"releases": records}, option=orjson.OPT_INDENT_2))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, index)
        return record


# -- HTTP -------------------------------------------------------------------------------------------
async def _registry(request: web.Request) -> ReleaseRegistry:
    from medagent.hub.access import principal  # the hub's auth; imported here to keep the CLI light

    await principal(request)  # any valid token: agents fetch releases, the operator lists them
    return request.app[RELEASES_KEY]


def _with_url(request: web.Request, record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "url": f"/releases/{record['version']}/wheel"}


async def list_releases(request: web.Request) -> web.Response:
    registry = await _registry(request)
    return web.json_response({"releases": [_with_url(request, r) for r in registry.records()]})


async def get_release(request: web.Request) -> web.Response:
    registry = await _registry(request)
    version = request.match_info["version"]
    record = registry.get(version) if version == "latest" or VERSION.match(version) else None
    if record is None:
        return web.json_response({"error": f"no release {version!r}"}, status=404)
    return web.json_response(_with_url(request, record))


async def get_wheel(request: web.Request) -> web.StreamResponse:
    registry = await _registry(request)
    version = request.match_info["version"]
    record = registry.get(version) if VERSION.match(version) else None
    if record is None:
        return web.json_response({"error": f"no release {version!r}"}, status=404)
    return web.FileResponse(registry.wheel_path(record), headers={"Content-Type": "application/octet-stream"})


def add_release_routes(app: web.Application, hub_data_dir: Path) -> None:
    app[RELEASES_KEY] = ReleaseRegistry(hub_data_dir)
    app.router.add_get("/releases", list_releases)
    app.router.add_get("/releases/{version}", get_release)
    app.router.add_get("/releases/{version}/wheel", get_wheel)


# -- CLI: medagent hub release add WHEEL | list --------------------------------------------------------
def add_release_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds ``release`` to the ``medagent hub`` subcommands (``sub``), with the hub's --data-dir."""
    release = sub.add_parser("release", parents=[common], help="manage the wheels the hub serves for agent upgrades")
    actions = release.add_subparsers(dest="release_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", parents=[common], help="register a medagent wheel (prints its sha256)")
    add.add_argument("wheel", type=Path)
    add.add_argument("--json", action="store_true", help="print one JSON document")
    listing = actions.add_parser("list", parents=[common], help="list registered releases")
    listing.add_argument("--json", action="store_true", help="print one JSON document")


def run_release_command(args: argparse.Namespace, data_dir: Path) -> int:
    registry = ReleaseRegistry(data_dir)
    if args.release_command == "add":
        try:
            record = registry.add(args.wheel)
        except (ReleaseError, OSError) as exc:
            print(f"medagent: cannot add release: {exc}", file=sys.stderr)
            return 1
        if args.json:
            sys.stdout.write(orjson.dumps(record).decode() + "\n")
        else:
            print(f"release {record['version']} added: {record['filename']} sha256 {record['sha256']}")
        return 0
    records = registry.records()
    if args.json:
        sys.stdout.write(orjson.dumps({"releases": records}).decode() + "\n")
    else:
        for record in records:
            print(f"{record['version']:<16} {record['filename']}  sha256 {record['sha256']}")
    return 0
