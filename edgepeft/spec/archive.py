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
