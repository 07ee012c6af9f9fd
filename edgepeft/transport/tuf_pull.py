"""Pull updates from a TUF repository on static hosting (fleets behind NAT, CDNs).

Each poll: ``tuf.ngclient.Updater.refresh()`` (timestamp -> snapshot -> targets,
every signature, version and expiry checked by python-tuf), then the verified
``edgepeft/index.json`` says which packages exist. The device tries, per adapter
name for its own base (and for the bundle), the listed versions above its floor
from the newest down: each is downloaded through the same updater (length and
hashes checked against the signed targets metadata) and installed with the same
transaction as every other link, which checks the package's own edgepeft
signature again; the first that serves ends the search.

What the repository says is not trusted beyond its signatures: the index is
parsed by :func:`parse_index` (shape, names, ids, versions, expiry; a malformed
entry is skipped and reported, a malformed index is one reported error), files
are named after their TUF-verified SHA-256 inside ``STATE/tuf/targets``, never
after anything in the index, and a package the device refused (by its content
hash: untrusted key, garbage, another runtime's format) is remembered in
``STATE/tuf/refused.json`` (bounded) and never fetched again, so it cannot hide
an older good version or cost a download on every poll. The poll loop reports
every failure (status ``links.pull`` and the log) and never ends on one.

The trust anchor: the repository's root metadata. Provision it (``--tuf-root``),
or let the device fetch ``1.root.json`` once and accept it only if a threshold of
its root role's signatures are valid signatures of keys the device already trusts
for updates (the fleet key), checked with the device's own copy of each key (a
root that lists a trusted key id with other key material is refused). A root
given with ``--tuf-root`` only has to be signed by its own root keys (an offline
root key). The accepted root is kept in ``STATE/tuf/anchor.json`` and used as
``bootstrap`` on every start; a refused root leaves nothing on disk.
python-tuf's Updater documents the same rule: trust-on-first-use of whatever root
a server hands out is what ``bootstrap`` exists to avoid.
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..contracts.names import is_id, is_name, path_inside
from ..errors import EdgePeftError, TransportError
from ..fsio import FileIO, write_atomic

INDEX = "edgepeft/index.json"
MAX_ROOT_BYTES = 1 << 20
MAX_INDEX_BYTES = 8 << 20
MAX_INDEX_ENTRIES = 10_000
MAX_REFUSED = 256  # refused packages remembered (oldest forgotten first)
MAX_REPORTED = 10  # skipped entries and errors named in a poll's report


# -- the trust anchor ------------------------------------------------------------------------------
def check_first_root(data: bytes, trusted_keys) -> None:
    """Accept a repository's first root only if a threshold of its root role's signatures are valid
    signatures of keys this device already trusts, checked with the device's own copy of each key.
    Raises ValueError saying why not."""
    from securesystemslib.signer import SSlibKey
    from tuf.api.metadata import Metadata, Root

    md = Metadata.from_bytes(data)
    root = md.signed
    if not isinstance(root, Root):
        raise ValueError("it is not root metadata")
    role = root.roles["root"]
    ours = {k.keyid: k for k in (SSlibKey.from_crypto(key) for key in trusted_keys)}
    good = 0
    for keyid, key in ours.items():
        if keyid not in role.keyids:
            continue
        listed = root.keys.get(keyid)
        if listed is None or (listed.keytype, listed.scheme, listed.keyval) != (key.keytype, key.scheme, key.keyval):
            raise ValueError(f"its root role lists this device's key id {keyid[:12]}... with other key material")
        sig = md.signatures.get(keyid)
        if sig is None:
            continue
        try:
            key.verify_signature(sig, md.signed_bytes)
        except Exception:  # securesystemslib's UnverifiedSignatureError and friends
            continue
        good += 1
    if good < role.threshold:
        raise ValueError(f"it carries {good} valid signature(s) of keys this device trusts; its root role "
                         f"needs {role.threshold}")
    root.verify_delegate("root", md.signed_bytes, md.signatures)  # and its own rule, as python-tuf will check


def check_given_root(data: bytes) -> None:
    """A root provisioned by hand must at least be root metadata signed by its own root keys (ValueError)."""
    from tuf.api.metadata import Metadata, Root

    md = Metadata.from_bytes(data)
    if not isinstance(md.signed, Root):
        raise ValueError("it is not root metadata")
    md.signed.verify_delegate("root", md.signed_bytes, md.signatures)


def _fetch_first_root(url: str, timeout: float = 30.0) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metadata/1.root.json", timeout=timeout) as r:
            return r.read(MAX_ROOT_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot fetch the repository's root metadata from {url}: {exc}",
                             hint="check --pull, or provision the root with --tuf-root") from exc


# -- the index -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexEntry:
    """One package the index lists (its fields checked; the package itself is verified on install)."""

    path: str
    type: str
    name: str
    version: int
    base_fingerprint: str | None
    id: str
    expires: _dt.datetime | None

    def expired(self, now: _dt.datetime) -> bool:
        return self.expires is not None and self.expires <= now


def _target_path(value) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= 1024 and not value.startswith("/") and "\\" not in value
            and not any(ord(c) < 32 or ord(c) == 127 for c in value)
            and all(p not in ("", ".", "..") for p in value.split("/")))


def _entry(e) -> IndexEntry:
    """One index entry, or ValueError naming what is wrong with it."""
    from ..contracts.update import parse_time

    if not isinstance(e, dict):
        raise ValueError("not an object")
    kind, name, version = e.get("type"), e.get("name"), e.get("version")
    if kind not in ("adapter", "bundle"):
        raise ValueError(f"type {str(kind)[:40]!r} is not adapter or bundle")
    if not is_name(name):
        raise ValueError(f"name {str(name)[:80]!r} is not a valid name")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 1 << 63:
        raise ValueError(f"version {str(version)[:40]!r} is not a positive integer")
    if not _target_path(e.get("path")):
        raise ValueError(f"path {str(e.get('path'))[:80]!r} is not a plain relative target path")
    if not is_id(e.get("id")):
        raise ValueError(f"id {str(e.get('id'))[:80]!r} is not 64 lowercase hex digits")
    base = e.get("base_fingerprint")
    if kind == "adapter" and not isinstance(base, str):
        raise ValueError("an adapter entry names no base_fingerprint")
    expires = e.get("expires")
    try:
        when = None if expires is None else parse_time(expires, "index", "expires")
    except EdgePeftError as exc:
        raise ValueError(exc.message) from None
    return IndexEntry(e["path"], kind, name, version, base if isinstance(base, str) else None, e["id"], when)


def parse_index(raw: bytes) -> tuple[list[IndexEntry], list[str]]:
    """The entries of ``edgepeft/index.json`` and what was wrong with the ones skipped.
    Raises :class:`TransportError` when the index as a whole is not an index."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TransportError(f"the repository's {INDEX} is not JSON: {str(exc)[:200]}",
                             hint="republish with `edgepeft publish`") from None
    if not isinstance(data, dict) or not isinstance(data.get("packages"), list):
        raise TransportError(f"the repository's {INDEX} is not an object with a \"packages\" list "
                             f"(it is {type(data).__name__})", hint="republish with `edgepeft publish`")
    if len(data["packages"]) > MAX_INDEX_ENTRIES:
        raise TransportError(f"the repository's {INDEX} lists {len(data['packages'])} packages, more than "
                             f"{MAX_INDEX_ENTRIES}", hint="prune old versions from the repository")
    entries, problems = [], []
    for i, e in enumerate(data["packages"]):
        try:
            entries.append(_entry(e))
        except ValueError as exc:
            problems.append(f"{INDEX} entry {i} skipped: {exc}")
    return entries, problems


# -- the puller ------------------------------------------------------------------------------------
class Puller:
    """Poll ``url`` every ``interval`` seconds for ``device``; :meth:`poll` runs one round."""

    def __init__(self, device, url: str, interval: float = 300.0, root: str | None = None, log=lambda msg: None):
        self.device, self.url, self.interval, self.log = device, url.rstrip("/"), float(interval), log
        self.dir = Path(device.state_dir) / "tuf"  # made once a root is trusted: a refused one leaves no trace
        self._root_file = root
        self._stop = threading.Event()
        self.last: dict = {}
        self.polls = 0

    def describe(self) -> dict:
        """The last poll's report, for the device's status (``links.pull``)."""
        return {"url": self.url, "polls": self.polls, **self.last}

    # -- trust -------------------------------------------------------------------------------------
    def _anchor(self) -> bytes:
        """The root this device trusts; raises :class:`TransportError` when none may be trusted."""
        anchor = self.dir / "anchor.json"
        if self._root_file:
            try:
                data = Path(self._root_file).read_bytes()
                check_given_root(data)
            except Exception as exc:  # OSError, tuf's and securesystemslib's own errors
                raise TransportError(f"--tuf-root {self._root_file} is not usable root metadata: {exc}",
                                     hint="give the repository's 1.root.json (or a later root)") from exc
        elif anchor.is_file() and self._stored_anchor(anchor) is not None:
            return anchor.read_bytes()
        else:
            data = _fetch_first_root(self.url)
            try:
                if len(data) > MAX_ROOT_BYTES:
                    raise ValueError(f"it is larger than {MAX_ROOT_BYTES} bytes")
                check_first_root(data, self.device.trusted_keys)
            except Exception as exc:  # tuf/securesystemslib raise their own types
                raise TransportError(f"the repository at {self.url} is not signed by a key this device trusts: {exc}",
                                     hint="provision its root.json with --tuf-root, or publish with the fleet key") from exc
        for d in (self.dir, self.dir / "metadata", self.dir / "targets"):
            d.mkdir(mode=0o700, exist_ok=True)
        if not anchor.is_file() or anchor.read_bytes() != data:
            write_atomic(path=anchor, data=data, io=FileIO())
        return data

    def _stored_anchor(self, anchor: Path) -> bytes | None:
        """The kept root, or None (and it is removed) when it is no root at all: a file cut short by a
        power loss must not stop every later poll; first contact's rule applies again instead."""
        try:
            data = anchor.read_bytes()
            check_given_root(data)
            return data
        except Exception as exc:  # OSError, tuf's deserialization and signature errors
            self.log(f"pull: {anchor} is not usable root metadata ({type(exc).__name__}); fetching the first root again")
            anchor.unlink(missing_ok=True)
            return None

    def _updater(self):
        from tuf.ngclient import Updater

        bootstrap = self._anchor()
        return Updater(metadata_dir=str(self.dir / "metadata"), metadata_base_url=self.url + "/metadata/",
                       target_dir=str(self.dir / "targets"), target_base_url=self.url + "/targets/",
                       bootstrap=bootstrap)

    # -- one round ---------------------------------------------------------------------------------
    def poll(self) -> list[dict]:
        """One round: refresh, pick, download and install; returns the results (may be empty).
        Raises :class:`TransportError` when the repository cannot be reached or verified, its index is
        malformed, or a download failed (after trying the other versions)."""
        self.polls += 1
        try:
            up = self._updater()
            up.refresh()
            info = up.get_targetinfo(INDEX)
            if info is None:
                self.last = {"at": time.time(), "results": [], "error": None}
                return []
            if info.length > MAX_INDEX_BYTES:
                raise TransportError(f"the repository's {INDEX} is {info.length} bytes, more than {MAX_INDEX_BYTES}",
                                     hint="prune old versions from the repository")
            got = Path(up.download_target(info, str(self.dir / "index.json")))
            raw = got.read_bytes()
            got.unlink(missing_ok=True)
        except EdgePeftError:
            raise
        except Exception as exc:  # tuf.api.exceptions.RepositoryError, DownloadError, OSError ...
            raise TransportError(f"pull from {self.url} failed: {type(exc).__name__}: {exc}",
                                 hint="the repository is unreachable, stale (expired timestamp) or tampered") from exc
        entries, skipped = parse_index(raw)
        refused = self._refused()
        results, errors = [], []
        for group in self._candidates(entries):
            for e in group:  # newest first; the first that serves ends the search
                res = self._try(up, e, refused, errors)
                if res is not None:
                    results.append(res)
                    if res["status"] == "healthy":
                        break
        for line in skipped[:MAX_REPORTED]:
            self.log(f"pull: {line}")
        self.last = {"at": time.time(), "results": results, "skipped": skipped[:MAX_REPORTED],
                     "refused": len(refused["entries"]), "errors": errors[:MAX_REPORTED],
                     "error": errors[0] if errors else None}
        if errors:
            raise TransportError(errors[0], hint="the repository is unreachable or its files do not match their metadata")
        return results

    def _try(self, up, e: IndexEntry, refused: dict, errors: list) -> dict | None:
        """Download and install one listed package; None when it was not even fetched."""
        try:
            tinfo = up.get_targetinfo(e.path)
        except Exception as exc:
            errors.append(f"{e.path}: its target metadata cannot be read: {type(exc).__name__}: {exc}")
            return None
        if tinfo is None:
            return None  # listed in the index but not a signed target: nothing to fetch
        digest = tinfo.hashes.get("sha256")
        if not is_id(digest) or any(r.get("sha256") == digest for r in refused["entries"]):
            return None
        limit = self.device.receiver.max_bytes
        if tinfo.length > limit:
            self._refuse(refused, digest, e, f"{tinfo.length} bytes is more than this device takes ({limit})")
            return None
        try:
            dest = path_inside(self.dir / "targets", digest, ".epu")
            path = Path(up.download_target(tinfo, str(dest)))
        except Exception as exc:
            errors.append(f"download of {e.path} failed: {type(exc).__name__}: {exc}")
            return None
        try:
            data = path.read_bytes()
            res = self.device.install(data)
            self.device.record(res)
        finally:
            path.unlink(missing_ok=True)
        self.log(f"pulled {e.path}: {res.status}" + (f" ({res.reason})" if res.reason else ""))
        if res.status == "rejected" and not res.retryable:
            self._refuse(refused, digest, e, res.reason or "refused")
        return res.to_dict()

    def _candidates(self, entries: list[IndexEntry]) -> list[list[IndexEntry]]:
        """Per adapter name (for this base) and for the bundle, the versions above the floor that did not
        fail before and have not expired, newest first; a new bundle first (a new base)."""
        status = self.device.status()
        floors = {a["name"]: (a["floor"], set(a["failed"])) for a in status["adapters"]}
        now = _dt.datetime.now(_dt.UTC)
        groups: dict = {}
        for e in entries:
            if e.expired(now):
                continue
            if e.type == "adapter":
                if e.base_fingerprint != status["base"]["fingerprint"]:
                    continue
                floor, failed = floors.get(e.name, (0, set()))
            else:
                floor, failed = status["bundle"]["floor"], set(status["bundle"]["failed"])
            if e.version <= floor or str(e.version) in failed:
                continue
            groups.setdefault((e.type != "bundle", e.name), {}).setdefault(e.version, e)
        return [sorted(g.values(), key=lambda e: -e.version) for _, g in sorted(groups.items())]

    # -- refusals, remembered by content hash ------------------------------------------------------
    def _context(self) -> str:
        """What a refusal depends on: a runtime upgrade or another set of trusted keys forgets them."""
        from .. import __version__
        from ..contracts.names import sha256_bytes
        from ..contracts.verify import key_id

        ids = sorted(key_id(k) for k in self.device.trusted_keys)
        return sha256_bytes(json.dumps([__version__, ids]).encode())[:16]

    def _refused(self) -> dict:
        try:
            data = json.loads((self.dir / "refused.json").read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("context") == self._context() and isinstance(data.get("entries"), list):
                return {"context": data["context"],
                        "entries": [r for r in data["entries"] if isinstance(r, dict) and is_id(r.get("sha256"))]}
        except (OSError, ValueError, RecursionError):
            pass  # none yet, or unreadable: start again (the worst case is one more download)
        return {"context": self._context(), "entries": []}

    def _refuse(self, refused: dict, digest: str, e: IndexEntry, reason: str) -> None:
        refused["entries"] = [r for r in refused["entries"] if r["sha256"] != digest][-(MAX_REFUSED - 1):]
        refused["entries"].append({"sha256": digest, "path": e.path, "version": e.version, "reason": reason[:300],
                                   "at": round(time.time(), 3)})
        write_atomic(path=self.dir / "refused.json", data=json.dumps(refused, sort_keys=True).encode("utf-8"), io=FileIO())

    # -- jobs and the loop -------------------------------------------------------------------------
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

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self._run, name="edgepeft-agent-pull", daemon=True)
        t.start()
        return t

    def _run(self) -> None:
        """Poll until stopped; whatever a poll meets is reported, and the next poll still comes."""
        while not self._stop.is_set():
            try:
                self.poll()
            except EdgePeftError as exc:
                self._failed(exc.message)
            except Exception as exc:  # a bug must not end the loop: report it and poll again
                self._failed(f"internal error: {type(exc).__name__}: {exc}")
            self._stop.wait(self.interval)

    def _failed(self, message: str) -> None:
        self.log(f"pull: {message}")
        if self.last.get("error") != message:  # (a round that failed on a download reported itself already)
            self.last = {"error": message}
        self.last = self.last | {"at": time.time()}

    def stop(self) -> None:
        self._stop.set()
