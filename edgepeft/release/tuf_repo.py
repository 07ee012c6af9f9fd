"""``edgepeft publish``: update packages into a TUF repository that any static web server or CDN can serve.

Uses python-tuf's metadata API (``tuf.api.metadata``), so devices can poll it
with ``tuf.ngclient.Updater``, the client the field audits: freeze attacks
(stale metadata past its expiry), mix-and-match (files from different
releases) and metadata rollback are refused by that library. What TUF does not
cover, an older *package* version that is still validly listed, the device's
version floor refuses; and every package keeps its own edgepeft signature,
checked again on the device.

Layout (consistent snapshots, so a CDN may cache everything but ``timestamp.json``)::

    REPO/metadata/1.root.json  N.targets.json  N.snapshot.json  timestamp.json
    REPO/targets/edgepeft/index.json-style files, stored as <sha256>.<name>
    REPO/targets/edgepeft/adapters/<name>/<sha256>.v<N>.epu
    REPO/targets/edgepeft/bundles/<sha256>.v<N>.epu

``edgepeft/index.json`` (a target like any other, so it is verified too) lists every
package with its type, name, version and base, so a device knows what to fetch.
By default one fleet key holds every role; ``role_keys`` gives roles their own keys
(e.g. an offline root key, an online timestamp key). Timestamp metadata expires
after a day by default: republish (``edgepeft publish --refresh``) at least that often,
or devices stop accepting updates, which is the point of it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from ..errors import BuildError, UsageError
from ..fsio import write_atomic

ROLES = ("root", "targets", "snapshot", "timestamp")
DEFAULT_EXPIRY = {"root": 365, "targets": 90, "snapshot": 30, "timestamp": 1}  # days
INDEX = "edgepeft/index.json"


def _signer(private_key):
    from securesystemslib.signer import CryptoSigner

    return CryptoSigner(private_key)


def _sslib_key(public_key):
    from securesystemslib.signer import SSlibKey

    return SSlibKey.from_crypto(public_key)


def _expires(days: float) -> _dt.datetime:
    return (_dt.datetime.now(_dt.UTC) + _dt.timedelta(days=days)).replace(microsecond=0)


class TufRepository:
    """A TUF repository in a folder. ``publish`` adds packages; ``refresh`` re-signs snapshot and timestamp.

    ``keys`` maps each role to a loaded Ed25519 private key. Raises :class:`UsageError` for
    keys that do not match an existing repository's root, :class:`BuildError` for a broken one.
    """

    def __init__(self, repo_dir: str | os.PathLike, keys: dict, *, expiry_days: dict | None = None):
        self.dir = Path(repo_dir)
        self.meta_dir, self.targets_dir = self.dir / "metadata", self.dir / "targets"
        self.keys = keys
        self.expiry = DEFAULT_EXPIRY | (expiry_days or {})
        self.signers = {role: _signer(k) for role, k in keys.items()}

    # -- reading -------------------------------------------------------------------------------
    def _load(self, role: str):
        from tuf.api.metadata import Metadata

        if role == "timestamp":
            path = self.meta_dir / "timestamp.json"
        else:
            versions = sorted(int(p.name.split(".")[0]) for p in self.meta_dir.glob(f"*.{role}.json")
                              if p.name.split(".")[0].isdigit())
            if not versions:
                return None
            path = self.meta_dir / f"{versions[-1]}.{role}.json"
        if not path.is_file():
            return None
        try:
            return Metadata.from_file(str(path))
        except Exception as exc:  # tuf raises DeserializationError and friends
            raise BuildError(f"{path} is not valid TUF metadata: {exc}", hint="restore the repository from backup") from exc

    def _write(self, md, filename: str) -> None:
        from tuf.api.serialization.json import JSONSerializer

        self.meta_dir.mkdir(parents=True, exist_ok=True)
        data = md.to_bytes(JSONSerializer(compact=False))
        write_atomic(self.meta_dir / filename, data, mode=0o644)

    # -- writing -------------------------------------------------------------------------------
    def _root(self):
        from tuf.api.metadata import Metadata, Root

        md = self._load("root")
        if md is not None:
            root = md.signed
            for role, key in self.keys.items():
                keyids = root.roles[role].keyids
                if _sslib_key(key.public_key()).keyid not in keyids:
                    raise UsageError(f"the {role} key given is not a {role} key of the repository in {self.dir}",
                                     hint="sign with the keys the repository was created with")
            return md
        root = Root(expires=_expires(self.expiry["root"]), consistent_snapshot=True)
        for role in ROLES:
            root.add_key(_sslib_key(self.keys[role].public_key()), role)
        md = Metadata(root)
        md.sign(self.signers["root"])
        self._write(md, "1.root.json")
        return md

    def publish(self, packages: list, *, trusted_keys=()) -> list[dict]:
        """Add update packages (paths) as targets, then new targets, snapshot and timestamp.

        Each package is verified first with ``trusted_keys`` (default: the targets key's own public
        key), so nothing a device would refuse is published. Returns what was added.
        """
        from tuf.api.metadata import Metadata, TargetFile, Targets

        from ..contracts.update import read_update, repository_path

        verify_with = list(trusted_keys) or [self.keys["targets"].public_key()]
        self._root()
        added, index = [], self._index()
        md = self._load("targets") or Metadata(Targets(expires=_expires(self.expiry["targets"])))
        targets = md.signed
        for p in packages:
            data = Path(p).read_bytes()
            envelope, _ = read_update(data, verify_with, source=str(p))
            meta = envelope.meta
            path = repository_path(meta)
            tf = TargetFile.from_data(path, data, ["sha256"])
            tf.unrecognized_fields["custom"] = {"edgepeft": {"type": meta.type, "name": meta.name,
                                                             "version": meta.version, "id": envelope.id,
                                                             "base_fingerprint": meta.base_fingerprint}}
            self._store_target(path, tf, data)
            targets.targets[path] = tf
            entry = {"path": path, "type": meta.type, "name": meta.name, "version": meta.version,
                     "base_fingerprint": meta.base_fingerprint, "id": envelope.id, "expires": meta.expires}
            index = [e for e in index if e["path"] != path] + [entry]
            added.append(entry)
        body = json.dumps({"schema_version": 1, "packages": sorted(index, key=lambda e: e["path"])},
                          indent=1, sort_keys=True).encode("utf-8")
        tf = TargetFile.from_data(INDEX, body, ["sha256"])
        self._store_target(INDEX, tf, body)
        targets.targets[INDEX] = tf
        self._bump(md, "targets")
        self.refresh(targets_version=targets.version)
        return added

    def _index(self) -> list[dict]:
        """The published index's entries; an index that is unreadable or of the wrong shape is rebuilt
        from the signed targets' own ``custom.edgepeft`` fields, so publishing again repairs it."""
        md = self._load("targets")
        if md is None:
            return []
        targets = md.signed.targets
        if INDEX in targets:
            tf = targets[INDEX]
            p = self.targets_dir / Path(INDEX).parent / f"{tf.hashes['sha256']}.{Path(INDEX).name}"
            try:
                packages = json.loads(p.read_text(encoding="utf-8")).get("packages")
                if isinstance(packages, list) and all(isinstance(e, dict) and isinstance(e.get("path"), str)
                                                      for e in packages):
                    return packages
            except (OSError, ValueError, AttributeError, RecursionError):
                pass
        return [{"path": path, "expires": None, **custom} for path, tf in targets.items() if path != INDEX
                and isinstance(custom := tf.unrecognized_fields.get("custom", {}).get("edgepeft"), dict)]

    def _store_target(self, path: str, tf, data: bytes) -> None:
        dest = self.targets_dir / Path(path).parent / f"{tf.hashes['sha256']}.{Path(path).name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, data, mode=0o644)

    def _bump(self, md, role: str) -> None:
        md.signed.version += 1 if self._load(role) is not None else 0
        md.signed.expires = _expires(self.expiry[role])
        md.signatures.clear()
        md.sign(self.signers[role])
        self._write(md, "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json")

    def refresh(self, *, targets_version: int | None = None) -> None:
        """New snapshot and timestamp (run at least as often as the timestamp expires)."""
        from tuf.api.metadata import Metadata, MetaFile, Snapshot, Timestamp

        self._root()
        tmd = self._load("targets")
        if tmd is None:
            raise UsageError(f"{self.dir} has no targets yet", hint="publish a package first")
        snap = self._load("snapshot") or Metadata(Snapshot(expires=_expires(self.expiry["snapshot"])))
        snap.signed.meta["targets.json"] = MetaFile(version=targets_version or tmd.signed.version)
        self._bump(snap, "snapshot")
        ts = self._load("timestamp") or Metadata(Timestamp(expires=_expires(self.expiry["timestamp"])))
        ts.signed.snapshot_meta = MetaFile(version=snap.signed.version)
        self._bump(ts, "timestamp")



def publish(packages, *, repo, key, role_keys: dict | None = None, expiry_days: dict | None = None,
            refresh_only: bool = False) -> list[dict]:
    """Publish ``packages`` into the repository folder ``repo``, signed with ``key`` (every role) or
    ``role_keys`` ({"timestamp": path, ...} overrides). Raises UsageError, SignatureError, BuildError."""
    from .._extras import require
    from ..contracts.fields import check_choice
    from ..contracts.signing import load_private_key

    require("tuf", feature="publishing a TUF repository")
    keys = {role: load_private_key(key) for role in ROLES}
    for role, path in (role_keys or {}).items():
        check_choice(role, ROLES, "TUF role")
        keys[role] = load_private_key(path)
    repo_obj = TufRepository(repo, keys, expiry_days=expiry_days)
    if refresh_only:
        repo_obj.refresh()
        return []
    if not packages:
        raise UsageError("nothing to publish", hint="pass one or more .epu files, or --refresh")
    return repo_obj.publish([Path(p) for p in packages])
