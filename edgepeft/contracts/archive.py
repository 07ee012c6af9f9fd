"""Reading a ``.epb`` bundle archive safely on a device (stdlib only): in place, or unpacked.

The archive is an uncompressed tar whose first member is ``manifest.json``. Before any byte
is used, every member is checked: a regular file, a normalized relative path (no ``..``,
``.``, empty parts, backslashes or control characters), listed once, not both a file and a
folder (``a`` then ``a/b``), within the size caps, and (once the manifest is parsed) listed in
the manifest with the same size. Anything else is a :class:`BundleError` naming the archive
and the member.

- :class:`ArchiveFiles` reads members in place (``edgepeft run bundle.epb``): each read is
  checked against its manifest entry, so what is loaded is what was hashed, with no copy on disk.
- :func:`unpack_bundle` extracts into a temporary sibling (files created exclusively, never
  through a link) and renames it into place, so a failed unpack leaves nothing behind.

Verification of the signature is the caller's step (:func:`edgepeft.contracts.verify.verify_bundle`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from ..errors import BundleError, IntegrityError

MAX_MANIFEST_BYTES = 16 << 20
MAX_MEMBERS = 10_000
MAX_BUNDLE_BYTES = 64 << 30
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def check_member_name(name: str, where: str) -> str:
    """A member path as the manifest must list it; raises :class:`BundleError` for any other."""
    parts = name.split("/")
    if (not name or name.startswith("/") or _BAD_CHARS.search(name) or len(name) > 1024
            or any(p in ("", ".", "..") for p in parts)):
        raise BundleError(f"{where} holds an unsafe entry {name!r}",
                          hint="only regular files with plain relative paths are allowed; rebuild the archive")
    return name


class _Members:
    """The validated member table of one archive: name -> TarInfo."""

    def __init__(self, archive: Path, max_bytes: int = MAX_BUNDLE_BYTES):
        self.archive = archive
        self.by_name: dict[str, tarfile.TarInfo] = {}
        dirs: set[str] = set()
        total = 0
        try:
            with tarfile.open(archive, mode="r:") as tar:
                for member in tar:
                    if len(self.by_name) >= MAX_MEMBERS:
                        raise BundleError(f"{archive} holds more than {MAX_MEMBERS} entries",
                                          hint="pass a .epb written by `edgepeft build`")
                    name = member.name
                    if not member.isfile():
                        raise BundleError(f"{archive} holds an unsafe entry {name!r} (not a regular file)",
                                          hint="only regular files are allowed; rebuild the archive")
                    check_member_name(name, str(archive))
                    if name in self.by_name:
                        raise BundleError(f"{archive} holds {name!r} twice", hint="rebuild the archive")
                    parents = {"/".join(name.split("/")[:i]) for i in range(1, name.count("/") + 1)}
                    if name in dirs or parents & set(self.by_name):
                        raise BundleError(f"{archive}: {name!r} is both a file and a folder",
                                          hint="rebuild the archive")
                    dirs |= parents
                    total += member.size
                    if total > max_bytes:
                        raise BundleError(f"{archive} unpacks to more than {max_bytes} bytes",
                                          hint="a bundle that large does not fit this device")
                    self.by_name[name] = member
        except (OSError, tarfile.TarError) as exc:
            raise BundleError(f"{archive} is not a readable bundle archive: {exc}",
                              hint="pass the .epb file written by `edgepeft build`, or transfer it again") from exc
        if "manifest.json" not in self.by_name:
            raise BundleError(f"{archive} has no manifest.json", hint="pass the .epb file written by `edgepeft build`")

    def read(self, name: str, size: int) -> bytes:
        member = self.by_name[name]
        if member.size != size:
            raise IntegrityError(f"{name} in {self.archive.name} is {member.size} bytes, the manifest says {size}",
                                 hint="the archive is damaged or was altered; transfer it again")
        with open(self.archive, "rb") as fh:
            fh.seek(member.offset_data)
            data = fh.read(size)
        if len(data) != size:
            raise BundleError(f"{self.archive} is truncated at {name}", hint="transfer it again")
        return data

    def sha256(self, name: str) -> str:
        """The SHA-256 of one member, streamed (a large graph is never held in memory)."""
        member = self.by_name[name]
        h, left = hashlib.sha256(), member.size
        with open(self.archive, "rb") as fh:
            fh.seek(member.offset_data)
            while left:
                block = fh.read(min(left, 1 << 20))
                if not block:
                    raise BundleError(f"{self.archive} is truncated at {name}", hint="transfer it again")
                h.update(block)
                left -= len(block)
        return h.hexdigest()

    def check_listed(self, files: dict[str, tuple[int, str]]) -> None:
        """Every member listed once in the manifest with its size; every listed file present."""
        for name, member in self.by_name.items():
            if name == "manifest.json":
                continue
            if name not in files:
                raise IntegrityError(f"{self.archive.name} holds {name}, which its manifest does not list",
                                     hint="copy the bundle again from a trusted source")
            if member.size != files[name][0]:
                raise IntegrityError(f"{name} in {self.archive.name} is {member.size} bytes, the manifest "
                                     f"says {files[name][0]}", hint="copy the bundle again from a trusted source")
        missing = sorted(set(files) - set(self.by_name))
        if missing:
            raise IntegrityError(f"{self.archive.name} lacks {', '.join(missing[:3])}", hint="transfer it again")


def read_archive_manifest(archive: str | os.PathLike) -> bytes:
    """The ``manifest.json`` bytes of a ``.epb`` without unpacking it; raises :class:`BundleError`.

    Nothing here is trusted yet: the caller verifies the signature over these bytes.
    """
    members = _Members(Path(archive))
    member = members.by_name["manifest.json"]
    if member.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{archive}: manifest.json is {member.size} bytes, too large to be one",
                          hint="pass a .epb written by `edgepeft build`")
    return members.read("manifest.json", member.size)


class ArchiveFiles:
    """A ``.epb`` read in place: the manifest's bytes, and each listed file checked on read.

    Raises :class:`BundleError` for an unsafe or unreadable archive.
    """

    def __init__(self, archive: str | os.PathLike):
        self.path = Path(archive)
        self._members = _Members(self.path)

    def manifest_bytes(self) -> bytes:
        member = self._members.by_name["manifest.json"]
        if member.size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{self.path}: manifest.json is {member.size} bytes, too large to be one",
                              hint="pass a .epb written by `edgepeft build`")
        return self._members.read("manifest.json", member.size)

    def check_listed(self, manifest) -> None:
        """Every member is listed in ``manifest`` with its size, every listed file is present."""
        self._members.check_listed({f.path: (f.size, f.sha256) for f in manifest.files})

    def check(self, entries) -> None:
        """Size and SHA-256 of each of ``entries`` (streamed); raises :class:`IntegrityError`."""
        for entry in entries:
            if entry.path not in self._members.by_name:
                raise IntegrityError(f"{entry.path} is missing from {self.path.name}", hint="transfer it again")
            if self._members.by_name[entry.path].size != entry.size or self._members.sha256(entry.path) != entry.sha256:
                raise IntegrityError(f"{entry.path} in {self.path.name} does not match the manifest "
                                     "(tampered or corrupted)", hint="copy the bundle again from a trusted source")

    def blocks(self, entry):
        """One listed file's bytes in blocks (unchecked: the caller hashes them). Raises
        :class:`IntegrityError` for a missing or resized member."""
        member = self._members.by_name.get(entry.path)
        if member is None:
            raise IntegrityError(f"{entry.path} is missing from {self.path.name}", hint="transfer it again")
        if member.size != entry.size:
            raise IntegrityError(f"{entry.path} in {self.path.name} is {member.size} bytes, the manifest says "
                                 f"{entry.size}", hint="the archive is damaged or was altered; transfer it again")
        with open(self.path, "rb") as fh:
            fh.seek(member.offset_data)
            left = member.size
            while left:
                block = fh.read(min(left, 1 << 20))
                if not block:
                    raise BundleError(f"{self.path} is truncated at {entry.path}", hint="transfer it again")
                left -= len(block)
                yield block

    def read(self, entry) -> bytes:
        """One listed file's bytes, checked against ``entry`` (size and SHA-256): what is returned
        is what was hashed. Raises :class:`IntegrityError`."""
        if entry.path not in self._members.by_name:
            raise IntegrityError(f"{entry.path} is missing from {self.path.name}", hint="transfer it again")
        data = self._members.read(entry.path, entry.size)
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise IntegrityError(f"{entry.path} in {self.path.name} does not match its SHA-256 in the manifest "
                                 "(tampered or corrupted)", hint="copy the bundle again from a trusted source")
        return data


def _manifest_files(raw: bytes, source: str) -> dict[str, tuple[int, str]]:
    from .manifest import Manifest, parse_manifest

    return {f.path: (f.size, f.sha256) for f in Manifest.from_dict(parse_manifest(raw, source), source).files}


def unpack_bundle(archive: str | os.PathLike, dest: str | os.PathLike, *, max_bytes: int = MAX_BUNDLE_BYTES) -> Path:
    """Extract ``archive`` into the new directory ``dest``, checking each file's size and SHA-256
    against the archive's manifest as it is written (the signature is the caller's next check).

    Raises :class:`BundleError` (unsafe, truncated or inconsistent archive; ``dest`` exists),
    :class:`IntegrityError` (a file that does not match the manifest) or
    :class:`~edgepeft.errors.SpecError` (a malformed manifest, naming the field).
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() or dest.is_symlink():
        raise BundleError(f"{dest} already exists", hint="unpack into a new directory")
    members = _Members(archive, max_bytes)
    source = f"{archive}:manifest.json"
    raw = read_archive_manifest(archive)
    files = _manifest_files(raw, source)
    members.check_listed(files)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        (tmp / "manifest.json").write_bytes(raw)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with open(archive, "rb") as fh:
            for name, (size, digest) in files.items():
                member = members.by_name[name]
                target = tmp.joinpath(*PurePosixPath(name).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                fh.seek(member.offset_data)
                h, left = hashlib.sha256(), size
                with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
                    while left:
                        block = fh.read(min(left, 1 << 20))
                        if not block:
                            raise BundleError(f"{archive} is truncated at {name}", hint="transfer it again")
                        h.update(block)
                        out.write(block)
                        left -= len(block)
                if h.hexdigest() != digest:
                    raise IntegrityError(f"{name} in {archive.name} does not match its SHA-256 in the manifest "
                                         "(tampered or corrupted)", hint="copy the bundle again from a trusted source")
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            d.chmod(0o755)
        os.replace(tmp, dest)
    except OSError as exc:
        raise BundleError(f"{archive} could not be unpacked into {dest}: {exc.strerror or exc}",
                          hint="check the free space and permissions there") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def verify_archive_files(archive: str | os.PathLike, files: dict[str, tuple[int, str]]) -> None:
    """Check every file of a ``.epb`` against ``files`` (path -> (size, hex SHA-256)).

    Raises :class:`IntegrityError` for a missing, extra, resized or altered file,
    :class:`BundleError` for an unsafe or unreadable archive.
    """
    archive = Path(archive)
    members = _Members(archive)
    members.check_listed(files)
    for path, (_, digest) in files.items():
        if members.sha256(path) != digest:
            raise IntegrityError(f"{path} in {archive.name} does not match the manifest (tampered or corrupted)",
                                 hint="copy the bundle again from a trusted source")
