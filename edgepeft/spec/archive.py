"""Unpack a ``.epb`` bundle archive safely on a device (stdlib only).

Refuses links, devices, absolute paths and ``..`` so a hostile archive cannot
write outside its folder; extracts into a temporary sibling and renames, so a
failed unpack leaves nothing behind. Verification of the content is the
caller's next step (:func:`edgepeft.spec.verify_bundle`).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from ..errors import BundleError


def unpack_bundle(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract ``archive`` into the new directory ``dest``; raises :class:`BundleError`."""
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise BundleError(f"{dest} already exists", hint="unpack into a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        try:
            tar = tarfile.open(archive, mode="r:")
        except (OSError, tarfile.TarError) as exc:
            raise BundleError(f"{archive} is not a bundle archive: {exc}",
                              hint="pass the .epb file written by `edgepeft build`") from exc
        with tar:
            for member in tar:
                name = PurePosixPath(member.name)
                if not member.isfile() or name.is_absolute() or ".." in name.parts:
                    raise BundleError(f"{archive} holds an unsafe entry {member.name!r}",
                                      hint="only regular files with relative paths are allowed")
                target = tmp.joinpath(*name.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                with open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        tmp.chmod(0o755)
        os.replace(tmp, dest)
    except tarfile.TarError as exc:
        raise BundleError(f"{archive} is truncated or corrupt: {exc}", hint="transfer it again") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


MAX_MANIFEST_BYTES = 16 << 20


def _members(tar: tarfile.TarFile, archive: Path):
    for member in tar:
        name = PurePosixPath(member.name)
        if not member.isfile() or name.is_absolute() or ".." in name.parts:
            raise BundleError(f"{archive} holds an unsafe entry {member.name!r}",
                              hint="only regular files with relative paths are allowed")
        yield member


def read_archive_manifest(archive: str | os.PathLike) -> bytes:
    """The ``manifest.json`` bytes of a ``.epb`` without unpacking it; raises :class:`BundleError`.

    Nothing here is trusted yet: the caller verifies the signature over these bytes.
    """
    archive = Path(archive)
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for member in _members(tar, archive):
                if member.name == "manifest.json":
                    if member.size > MAX_MANIFEST_BYTES:
                        raise BundleError(f"{archive}: manifest.json is {member.size} bytes, too large to be one",
                                          hint="pass a .epb written by `edgepeft build`")
                    return tar.extractfile(member).read()
    except (OSError, tarfile.TarError) as exc:
        raise BundleError(f"{archive} is not a readable bundle archive: {exc}",
                          hint="pass the .epb file written by `edgepeft build`, or its directory") from exc
    raise BundleError(f"{archive} has no manifest.json", hint="pass the .epb file written by `edgepeft build`")


def verify_archive_files(archive: str | os.PathLike, files: dict[str, tuple[int, str]]) -> None:
    """Check every file of a ``.epb`` against ``files`` (path -> (size, hex SHA-256)) while streaming it.

    Raises :class:`~edgepeft.errors.IntegrityError` for a missing, extra, resized or altered
    file, :class:`BundleError` for an unreadable archive.
    """
    import hashlib

    from ..errors import IntegrityError

    archive = Path(archive)
    seen = set()
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for member in _members(tar, archive):
                if member.name == "manifest.json":
                    continue
                if member.name not in files or member.name in seen:
                    raise IntegrityError(f"{archive} holds {member.name}, which the manifest does not list once",
                                         hint="copy the bundle again from a trusted source")
                seen.add(member.name)
                size, digest = files[member.name]
                h = hashlib.sha256()
                src = tar.extractfile(member)
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                if member.size != size or h.hexdigest() != digest:
                    raise IntegrityError(f"{member.name} in {archive.name} does not match the manifest "
                                         "(tampered or corrupted)", hint="copy the bundle again from a trusted source")
    except (OSError, tarfile.TarError) as exc:
        raise BundleError(f"{archive} is truncated or corrupt: {exc}", hint="transfer it again") from exc
    missing = sorted(set(files) - seen)
    if missing:
        raise IntegrityError(f"{archive.name} lacks {', '.join(missing[:3])}", hint="transfer it again")
