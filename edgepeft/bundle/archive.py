"""The single-file form of a bundle (``.epb``): an uncompressed POSIX tar of the bundle directory.

Uncompressed because int4/int8 weights barely compress and a device should be
able to stream-extract without holding the archive twice. Unpacking (device
side) lives in :mod:`edgepeft.contracts.archive`.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from ..fsio import atomic_path


def pack_bundle(bundle_dir: str | os.PathLike, archive: str | os.PathLike) -> Path:
    """Write ``archive`` from ``bundle_dir`` atomically (temp file + rename); manifest first.

    Member order is fixed and metadata normalised, so the same bundle gives the
    same archive bytes.
    """
    root, archive = Path(bundle_dir), Path(archive)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name != "manifest.json")
    # readable 0644: the archive is meant to be shipped
    with atomic_path(archive, mode=0o644) as tmp, tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in files:
            info = tar.gettarinfo(str(p), arcname=p.relative_to(root).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o644
            with open(p, "rb") as src:
                tar.addfile(info, src)
    return archive
