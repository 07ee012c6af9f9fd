"""Device-side trust: Ed25519 signature over the canonical manifest, then size + SHA-256 of every file.

Lives in ``spec`` (not in the server's ``bundle`` package) so a device can
verify without any server code. Keys are PEM files (``edgepeft keygen`` writes
``NAME.key`` and ``NAME.pub``); a key id is the first 16 hex digits of the
SHA-256 of the raw public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Union

from ..errors import IntegrityError, SignatureError
from .manifest import MANIFEST_NAME, Manifest, canonical_bytes, read_manifest_dict
from .names import sha256_file  # noqa: F401 (re-exported by edgepeft.contracts)

KeyLike = Union[str, os.PathLike, bytes, "Ed25519PublicKey"]  # noqa: F821


def load_public_key(key: KeyLike):
    """An Ed25519 public key from a PEM file path, PEM bytes or raw 32 bytes.

    Raises :class:`SignatureError` if it is not an Ed25519 public key.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(key, Ed25519PublicKey):
        return key
    source = "public key"
    if isinstance(key, (str, os.PathLike)):
        source = str(key)
        try:
            key = Path(key).read_bytes()
        except OSError as exc:
            raise SignatureError(f"cannot read trusted key {source}: {exc.strerror or exc}",
                                 hint="pass the .pub file written by `edgepeft keygen`") from exc
    try:
        raw = key if len(key) == 32 else _ed25519_pem(key)
        if raw is not None:
            return Ed25519PublicKey.from_public_bytes(raw)
        from cryptography.hazmat.primitives import serialization  # other PEM keys (and its error messages)

        loaded = serialization.load_pem_public_key(key)
    except ValueError as exc:
        raise SignatureError(f"{source} is not a PEM public key",
                             hint="pass the .pub file written by `edgepeft keygen`, not the private .key") from exc
    if not isinstance(loaded, Ed25519PublicKey):
        raise SignatureError(f"{source} is not an Ed25519 key", hint="create one with `edgepeft keygen`")
    return loaded


_PEM_HEAD, _PEM_TAIL = b"-----BEGIN PUBLIC KEY-----", b"-----END PUBLIC KEY-----"
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")  # DER SubjectPublicKeyInfo prefix of an Ed25519 key


def _ed25519_pem(data: bytes) -> bytes | None:
    """The 32 key bytes of a PEM public key that is Ed25519 (what `edgepeft keygen` writes), else None.

    Why: cryptography's PEM loader imports its whole serialization package (SSH formats included),
    a measurable part of opening a bundle in a fresh process (``tools/profile_startup.py``)."""
    text = bytes(data).strip()
    if not (text.startswith(_PEM_HEAD) and text.endswith(_PEM_TAIL)):
        return None
    try:
        der = base64.b64decode(b"".join(text[len(_PEM_HEAD):-len(_PEM_TAIL)].split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    return der[len(_ED25519_SPKI):] if len(der) == len(_ED25519_SPKI) + 32 and der.startswith(_ED25519_SPKI) else None


def key_id(public_key) -> str:
    """Short, stable identifier of a public key, recorded in signatures."""
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()[:16]


def _trusted(trusted_keys: Iterable[KeyLike]) -> dict:
    keys = [load_public_key(k) for k in trusted_keys]
    if not keys:
        raise SignatureError("no trusted public key was given, so nothing can be verified",
                             hint="pass --trusted-key with the .pub file from `edgepeft keygen`")
    return {key_id(k): k for k in keys}


def verify_detached(message: bytes, signatures: list, trusted_keys: Iterable[KeyLike], source: str) -> str:
    """Check that one of ``signatures`` (``{"algorithm": "ed25519", "key_id", "value"}`` dicts) is a
    valid signature of ``message`` by a trusted key; return that key's id.

    Several signatures let a fleet rotate keys (sign with the old and the new one). Raises
    :class:`SignatureError` when none is by a trusted key, or a trusted key's signature does not match.
    """
    from cryptography.exceptions import InvalidSignature

    by_id = _trusted(trusted_keys)
    seen = []
    for sig in signatures:
        if not isinstance(sig, dict) or sig.get("algorithm") != "ed25519":
            continue
        kid = sig.get("key_id")
        seen.append(repr(kid))
        key = by_id.get(kid) if isinstance(kid, str) else None
        if key is None:
            continue
        try:
            value = base64.b64decode(sig.get("value", ""), validate=True)
            key.verify(value, message)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise SignatureError(f"{source}: the signature is not valid base64",
                                 hint="recreate it; it was corrupted") from exc
        except InvalidSignature as exc:
            raise SignatureError(f"{source}: the signature does not match its content (tampered or corrupted)",
                                 hint="fetch it again from its source") from exc
        return kid
    if not seen:
        raise SignatureError(f"{source} is not signed with ed25519",
                             hint="sign it with a key from `edgepeft keygen`")
    raise SignatureError(f"{source} was signed by key {', '.join(seen)}, which this device does not trust "
                         f"(it trusts {', '.join(map(repr, by_id))})",
                         hint="sign it with a key the device trusts, or provision this key on the device first")


def verify_signature(data: dict, trusted_keys: Iterable[KeyLike], source: str = MANIFEST_NAME) -> str:
    """Check ``data['signature']`` (a bundle manifest's) against the trusted keys; return the key id.

    Raises :class:`SignatureError` when the signature is missing, malformed, made
    by an untrusted key, or does not match the content.
    """
    sig = data.get("signature")
    if not isinstance(sig, dict) or sig.get("algorithm") != "ed25519":
        _trusted(trusted_keys)
        raise SignatureError(f"{source} is not signed with ed25519",
                             hint="rebuild it with `edgepeft build --key KEY`")
    try:
        message = canonical_bytes(data)
    except (TypeError, ValueError) as exc:
        raise SignatureError(f"{source} cannot be put in its canonical signed form: {exc}",
                             hint="fetch the bundle or update again from its source") from exc
    return verify_detached(message, [sig], trusted_keys, source)


def open_in_bundle(root: Path, relpath: str) -> int:
    """A read-only descriptor of ``root/relpath``, opened one path component at a time without
    following a symbolic link anywhere below ``root`` (a linked folder is refused like a linked
    file). Raises :class:`IntegrityError`."""
    root = Path(root)
    parts = relpath.split("/")
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    if not (os.open in os.supports_dir_fd and nofollow):  # pragma: no cover - not POSIX: check with lstat
        p = root.joinpath(*parts)
        for k in range(1, len(parts) + 1):
            if root.joinpath(*parts[:k]).is_symlink():
                raise IntegrityError(f"{relpath} passes through a link; links are not allowed in bundles",
                                     hint="copy the bundle again as plain files")
        return _open(lambda: os.open(p, os.O_RDONLY), relpath, root)
    fd = _open(lambda: os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)), relpath, root)
    try:
        for part in parts[:-1]:
            nxt = _open(lambda: os.open(part, os.O_RDONLY | os.O_DIRECTORY | nofollow, dir_fd=fd), relpath, root)
            os.close(fd)
            fd = nxt
        return _open(lambda: os.open(parts[-1], os.O_RDONLY | nofollow, dir_fd=fd), relpath, root)
    finally:
        os.close(fd)


def _open(opener, label: str, root: Path) -> int:
    try:
        return opener()
    except FileNotFoundError as exc:
        raise IntegrityError(f"{label} is missing from {root}", hint="copy or unpack the whole bundle again") from exc
    except OSError as exc:
        raise IntegrityError(f"{label} cannot be opened ({exc.strerror}); links are not allowed in bundles",
                             hint="copy the bundle again as plain files") from exc


def _check_open_file(fh, entry, label: str) -> None:
    """An opened bundle file must be a regular file of the listed size; raises :class:`IntegrityError`."""
    import stat

    st = os.fstat(fh.fileno())
    if not stat.S_ISREG(st.st_mode):
        raise IntegrityError(f"{label} is not a regular file", hint="copy the bundle again as plain files")
    if st.st_size != entry.size:
        raise IntegrityError(f"{label} is {st.st_size} bytes, the manifest says {entry.size}",
                             hint="the file is truncated or replaced; copy the bundle again")


def _read_checked(fd: int, entry, label: str, *, keep: bool = True) -> bytes | None:
    """Read a regular file's bytes from ``fd`` and check size and SHA-256 (closing ``fd``)."""
    with os.fdopen(fd, "rb") as fh:
        _check_open_file(fh, entry, label)
        if keep:
            data = fh.read(entry.size + 1)
            ok = len(data) == entry.size and hashlib.sha256(data).hexdigest() == entry.sha256
        else:
            data, h, n = None, hashlib.sha256(), 0
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
                n += len(block)
            ok = n == entry.size and h.hexdigest() == entry.sha256
    if not ok:
        raise IntegrityError(f"{label} does not match its SHA-256 in the manifest (tampered or corrupted)",
                             hint="copy the bundle again from a trusted source")
    return data


def verify_files(root: Path, manifest: Manifest, paths: Iterable[str] | None = None) -> None:
    """Check size, then SHA-256, of each listed file (all by default); raises :class:`IntegrityError`."""
    wanted = set(paths) if paths is not None else None
    for entry in manifest.files:
        if wanted is None or entry.path in wanted:
            _read_checked(open_in_bundle(Path(root), entry.path), entry, entry.path, keep=False)


def read_verified(root: Path, entry, *, source: str | None = None) -> bytes:
    """Read one bundle file once and check those very bytes against its manifest entry.

    What is returned is what was hashed, so a write to the file after this check cannot change
    what the caller loads. Symbolic links (the file's or a folder's on its path) and non-regular
    files are refused. Raises :class:`IntegrityError` (missing, a link, wrong size or hash).
    """
    return _read_checked(open_in_bundle(Path(root), entry.path), entry, source or entry.path)


class VerifiedFile:
    """A bundle file's verified content for a loader that reads by path (onnxruntime): a sealed
    in-memory file (Linux ``memfd``: nothing can write to it once sealed, and it is gone when
    closed), else the verified bytes. ``source`` is what to hand the loader; :meth:`close` frees it.

    Loading from a path lets onnxruntime keep one copy of the graph instead of two (less resident
    memory than loading from a bytes object: docs/measured-defaults.md)."""

    def __init__(self, fd: int | None = None, data: bytes | None = None, size: int = 0):
        self._fd, self._data, self.size = fd, data, size

    @property
    def source(self):
        return f"/proc/self/fd/{self._fd}" if self._fd is not None else self._data

    def view(self) -> memoryview:
        """The content as a read-only buffer: a mapping of the sealed file (its pages are given back
        to the system when the last view goes, unlike a freed bytes object), else the bytes. The
        view stays valid after :meth:`close`."""
        import mmap

        if self._fd is None or self.size == 0:
            return memoryview(self._data if self._data is not None else b"")
        return memoryview(mmap.mmap(self._fd, self.size, access=mmap.ACCESS_READ))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._data = None


class _BesideHasher:
    """SHA-256 of the blocks given to :meth:`add`, computed by a thread of its own, so that hashing a large
    file overlaps reading and copying it (hashlib and os.write both release the GIL). The blocks must be
    immutable (``bytes``): what is hashed is the very object the caller writes. At most a few blocks wait."""

    def __init__(self, depth: int = 4):
        import queue
        import threading

        self._h = hashlib.sha256()
        self._q: queue.Queue = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, name="edgepeft-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (block := self._q.get()) is not None:
            self._h.update(block)

    def add(self, block: bytes) -> None:
        self._q.put(block)

    def hexdigest(self) -> str:
        """The digest of every block added; ends the thread (call once)."""
        self._q.put(None)
        self._thread.join()
        return self._h.hexdigest()


def _sealed(blocks, entry, label: str) -> VerifiedFile | None:
    """Stream ``blocks`` into a memfd while hashing; seal it once size and SHA-256 match ``entry``.
    None where memfds do not exist (not Linux) or the seal never takes (the caller then loads the
    verified bytes). Raises :class:`IntegrityError` for content that does not match."""
    import fcntl

    if not hasattr(os, "memfd_create") or not hasattr(fcntl, "F_ADD_SEALS"):
        return None
    fd = os.memfd_create(label.replace("/", "_")[:200], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        hasher, n = _BesideHasher(), 0
        try:
            for block in blocks:
                hasher.add(block)  # hashed on another core while this one copies it into the memfd
                n += len(block)
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            digest = hasher.hexdigest()
        if n != entry.size or digest != entry.sha256:
            raise IntegrityError(f"{label} does not match its SHA-256 in the manifest (tampered or corrupted)",
                                 hint="copy the bundle again from a trusted source")
        try:
            _seal(fd, label)
        except IntegrityError:  # its pages stayed busy: the caller falls back to the verified bytes
            os.close(fd)
            return None
        return VerifiedFile(fd=fd, size=n)
    except BaseException:
        os.close(fd)
        raise


def _seal(fd: int, label: str, tries: int = 6, wait=None) -> None:
    """Forbid every further change to the memfd. The kernel refuses the write seal (EBUSY) while
    something else still holds a reference to one of its pages (seen here with the kernel's page
    access monitor, kdamond, running); such references are short-lived, so it tries again after
    ``wait(seconds)`` (``time.sleep``; a test passes its own). Raises :class:`IntegrityError` when the
    seal never takes."""
    import errno
    import fcntl
    import time

    wait = wait or time.sleep
    for attempt in range(tries):
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_SEAL)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            if attempt == tries - 1:
                raise IntegrityError(f"the verified in-memory copy of {label} cannot be sealed against changes "
                                     "(the kernel says its pages are busy)",
                                     hint="open the bundle again; if it persists, report the kernel version") from exc
            wait(0.005 * 2 ** attempt)


class BundleFiles:
    """Where a bundle's files come from: a directory, or a ``.epb`` archive read in place.

    ``BundleFiles(path)`` picks by what ``path`` is. :meth:`read` returns a listed file's bytes
    checked against its entry; :meth:`check` verifies files without keeping them. Raises
    :class:`BundleError` for an unreadable archive or a path that is neither.
    """

    def __init__(self, path: str | os.PathLike):
        from ..errors import BundleError

        self.path = Path(path)
        self.archive = None
        if self.path.is_file():  # imported only here: a folder's open never loads the archive reader (tarfile)
            from .archive import ArchiveFiles

            self.archive = ArchiveFiles(self.path)
        if self.archive is None and self.path.exists() and not self.path.is_dir():
            raise BundleError(f"{self.path} is neither a bundle directory nor a .epb archive",
                              hint="pass the folder or the .epb written by `edgepeft build`")

    @property
    def manifest_source(self) -> str:
        return f"{self.path}:{MANIFEST_NAME}" if self.archive is not None else str(self.path / MANIFEST_NAME)

    def manifest_dict(self) -> dict:
        from .manifest import parse_manifest

        if self.archive is not None:
            return parse_manifest(self.archive.manifest_bytes(), self.manifest_source)
        return read_manifest_dict(self.path / MANIFEST_NAME)

    def read(self, entry) -> bytes:
        return self.archive.read(entry) if self.archive is not None else read_verified(self.path, entry)

    def open_verified(self, entry) -> VerifiedFile:
        """A listed file checked against ``entry`` as a sealed in-memory file a loader opens by path
        (the bytes where that is not possible). Raises :class:`IntegrityError`."""
        if self.archive is not None:
            blocks = self.archive.blocks(entry)
            sealed = _sealed(blocks, entry, entry.path)
            return sealed if sealed is not None else VerifiedFile(data=self.archive.read(entry))
        fd = open_in_bundle(self.path, entry.path)
        with os.fdopen(fd, "rb") as fh:
            _check_open_file(fh, entry, entry.path)
            sealed = _sealed(iter(lambda: fh.read(2 << 20), b""), entry, entry.path)
        return sealed if sealed is not None else VerifiedFile(data=read_verified(self.path, entry))

    def check(self, manifest: Manifest, paths: Iterable[str] | None = None) -> None:
        if self.archive is not None:
            wanted = set(paths) if paths is not None else None
            self.archive.check([f for f in manifest.files if wanted is None or f.path in wanted])
        else:
            verify_files(self.path, manifest, paths)


def verify_bundle(bundle: str | os.PathLike | BundleFiles, trusted_keys: Iterable[KeyLike], *,
                  check_files: bool = True) -> Manifest:
    """Open a bundle (directory or ``.epb``) the way a device must: signature first, then schema,
    then files (an archive may hold only the files its manifest lists).

    Raises :class:`SignatureError`, :class:`~edgepeft.errors.SpecError`, :class:`IntegrityError`
    or :class:`~edgepeft.errors.BundleError`; returns the validated :class:`Manifest`.
    """
    files = bundle if isinstance(bundle, BundleFiles) else BundleFiles(bundle)
    data = files.manifest_dict()
    verify_signature(data, trusted_keys, files.manifest_source)
    manifest = Manifest.from_dict(data, files.manifest_source)
    if files.archive is not None:
        files.archive.check_listed(manifest)
    if check_files:
        files.check(manifest)
    return manifest
