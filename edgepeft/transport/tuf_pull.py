"""Pull updates from a TUF repository on static hosting (fleets behind NAT, CDNs).

Each poll: ``tuf.ngclient.Updater.refresh()`` (timestamp -> snapshot -> targets,
every signature, version and expiry checked by python-tuf), then the verified
``edgepeft/index.json`` says which packages exist; the device picks the newest
package per adapter name for its own base (and the newest bundle) above its
version floor and not failed before, downloads it through the same updater
(length and hashes checked against the signed targets metadata), and installs
it with the same transaction as every other link, which checks the package's
own edgepeft signature again.

The trust anchor: the repository's root metadata. Provision it (``--tuf-root``), or
let the device fetch ``1.root.json`` once and accept it only if every role's keys
include, and the root is signed by, a key the device already trusts for updates
(the fleet key). Either way it is kept in ``STATE/tuf/anchor.json`` and used as
``bootstrap`` on every start.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from ..errors import EdgePeftError, TransportError
from ..fsio import write_atomic

INDEX = "edgepeft/index.json"


def _anchor_from_repo(url: str, trusted_keys, timeout: float = 30.0) -> bytes:
    """Fetch 1.root.json and check it against the device's trusted Ed25519 keys."""
    import urllib.request

    from securesystemslib.signer import SSlibKey
    from tuf.api.metadata import Metadata, Root

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metadata/1.root.json", timeout=timeout) as r:
            data = r.read(1 << 20)
    except OSError as exc:
        raise TransportError(f"cannot fetch the repository's root metadata from {url}: {exc}",
                             hint="check --pull, or provision the root with --tuf-root") from exc
    try:
        md = Metadata[Root].from_bytes(data)
        root = md.signed
        if not isinstance(root, Root):
            raise ValueError("not root metadata")
        ours = {SSlibKey.from_crypto(k).keyid for k in trusted_keys}
        if not ours & set(root.roles["root"].keyids):
            raise ValueError("its root role holds none of the keys this device trusts")
        root.verify_delegate("root", md.signed_bytes, md.signatures)
    except Exception as exc:  # tuf/securesystemslib raise their own types
        raise TransportError(f"the repository at {url} is not signed by a key this device trusts: {exc}",
                             hint="provision its root.json with --tuf-root, or publish with the fleet key") from exc
    return data


class Puller:
    """Poll ``url`` every ``interval`` seconds for ``device``; :meth:`poll` runs one round."""

    def __init__(self, device, url: str, interval: float = 300.0, root: str | None = None, log=lambda msg: None):
        self.device, self.url, self.interval, self.log = device, url.rstrip("/"), float(interval), log
        self.dir = Path(device.state_dir) / "tuf"
        (self.dir / "metadata").mkdir(parents=True, exist_ok=True)
        (self.dir / "targets").mkdir(parents=True, exist_ok=True)
        self._root_file = root
        self._stop = threading.Event()
        self.last: dict = {}

    def _anchor(self) -> bytes:
        anchor = self.dir / "anchor.json"
        if anchor.is_file():
            return anchor.read_bytes()
        data = Path(self._root_file).read_bytes() if self._root_file else \
            _anchor_from_repo(self.url, self.device.trusted_keys)
        write_atomic(anchor, data)
        return data

    def _updater(self):
        from tuf.ngclient import Updater

        return Updater(metadata_dir=str(self.dir / "metadata"), metadata_base_url=self.url + "/metadata/",
                       target_dir=str(self.dir / "targets"), target_base_url=self.url + "/targets/",
                       bootstrap=self._anchor())

    def poll(self) -> list[dict]:
        """One round: refresh, pick, download and install; returns the results (may be empty).
        Raises :class:`TransportError` when the repository cannot be reached or verified."""
        try:
            up = self._updater()
            up.refresh()
            info = up.get_targetinfo(INDEX)
            if info is None:
                return []
            index = json.loads(Path(up.download_target(info, str(self.dir / "index.json"))).read_text("utf-8"))
        except EdgePeftError:
            raise
        except Exception as exc:  # tuf.api.exceptions.RepositoryError, DownloadError, OSError ...
            raise TransportError(f"pull from {self.url} failed: {type(exc).__name__}: {exc}",
                                 hint="the repository is unreachable, stale (expired timestamp) or tampered") from exc
        results = []
        for entry in self._wanted(index.get("packages", [])):
            try:
                tinfo = up.get_targetinfo(entry["path"])
                if tinfo is None:
                    continue
                dest = self.dir / "targets" / f"{entry['id']}.epu"
                path = up.download_target(tinfo, str(dest))
                data = Path(path).read_bytes()
            except Exception as exc:
                raise TransportError(f"download of {entry['path']} failed: {exc}",
                                     hint="the repository is unreachable or its files do not match their metadata") from exc
            try:
                res = self.device.install(data)
                self.device.record(res)
            finally:
                Path(path).unlink(missing_ok=True)
            self.log(f"pulled {entry['path']}: {res.status}" + (f" ({res.reason})" if res.reason else ""))
            results.append(res.to_dict())
        self.last = {"at": time.time(), "results": results}
        return results

    def fetch(self, path: str) -> bytes:
        """One package by its target path (a job names it), verified by TUF on the way in.
        Raises :class:`TransportError` when it is not listed or cannot be downloaded intact."""
        try:
            up = self._updater()
            up.refresh()
            info = up.get_targetinfo(path)
            if info is None:
                raise TransportError(f"{path} is not listed in the repository at {self.url}",
                                     hint="publish it with `edgepeft publish`")
            dest = self.dir / "targets" / "job.epu"
            got = Path(up.download_target(info, str(dest)))
            try:
                return got.read_bytes()
            finally:
                got.unlink(missing_ok=True)
        except EdgePeftError:
            raise
        except Exception as exc:
            raise TransportError(f"download of {path} from {self.url} failed: {type(exc).__name__}: {exc}",
                                 hint="the repository is unreachable, stale or tampered") from exc

    def _wanted(self, packages: list) -> list[dict]:
        """The newest package per adapter name (for this base) and the newest bundle, above the floors."""
        status = self.device.status()
        floors = {a["name"]: (a["floor"], set(a["failed"])) for a in status["adapters"]}
        best: dict = {}
        for e in packages:
            if not isinstance(e, dict) or not isinstance(e.get("version"), int):
                continue
            if e.get("type") == "adapter":
                if e.get("base_fingerprint") != status["base"]["fingerprint"]:
                    continue
                floor, failed = floors.get(e.get("name"), (0, set()))
                key = ("adapter", e.get("name"))
            elif e.get("type") == "bundle":
                floor, failed = status["bundle"]["floor"], set(status["bundle"]["failed"])
                key = ("bundle", "bundle")
            else:
                continue
            if e["version"] <= floor or str(e["version"]) in failed:
                continue
            if key not in best or e["version"] > best[key]["version"]:
                best[key] = e
        return sorted(best.values(), key=lambda e: (e["type"] != "bundle", e["path"]))  # a new base first

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self._run, name="edgepeft-agent-pull", daemon=True)
        t.start()
        return t

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except EdgePeftError as exc:
                self.log(f"pull: {exc.message}")
                self.last = {"at": time.time(), "error": exc.message}
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
