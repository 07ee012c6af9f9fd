"""The bundle manifest: what a bundle is, what it needs, and every file it holds.

The manifest is the contract between ``edgepeft build`` (server) and the
runtime (device). It is plain data: parsing validates every field and names
the file and field on error; :func:`canonical_bytes` is the exact byte string
that is signed, so server and device agree on it without sharing code paths.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SpecError
from .fields import Fields
from .jsontext import loads_untrusted
from .methods import ACTIVATIONS, BOTTLENECK, BOTTLENECK_POINTS, LORA, METHODS, PREFIX_METHODS
from .names import check_name, is_id

MANIFEST_SCHEMA_VERSION = 1
MAX_FILE_BYTES = 1 << 46  # 64 TiB: a size beyond any device
MANIFEST_NAME = "manifest.json"
TASKS = ("causal-lm", "classification")


def _safe_relpath(value: str, source: str, field_name: str) -> str:
    parts = value.split("/")
    if (not value or value.startswith("/") or "\\" in value or re.search(r"[\x00-\x1f\x7f]", value)
            or any(p in ("", ".", "..") for p in parts) or len(value) > 1024):
        raise SpecError(source, field_name, f"{value!r} must be a plain relative path inside the bundle",
                        hint='e.g. "adapters/support-1.onnx_adapter"')
    return value


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter version the bundle carries (or an update delivers).

    ``method`` names its family (:mod:`.methods`); the family's size fields are required
    for it and absent otherwise: ``rank`` and ``alpha`` (LoRA), ``virtual_tokens``
    (prefix and prompt tuning), ``bottleneck_size`` and ``activation`` (bottleneck, whose
    ``target_modules`` are its points: ``attn_out``, ``mlp_out``).
    """

    name: str
    version: int
    file: str
    method: str
    base_fingerprint: str
    rank: int | None = None
    alpha: float | None = None
    task: str = "causal-lm"
    dtype: str = "fp32"
    target_modules: tuple[str, ...] = ()
    labels: tuple[str, ...] | None = None
    review_threshold: float | None = None
    virtual_tokens: int | None = None
    bottleneck_size: int | None = None
    activation: str | None = None
    metrics: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_fields(cls, f: Fields) -> AdapterEntry:
        method = f.str("method", choices=METHODS)
        lora, prefix, bottleneck = method == LORA, method in PREFIX_METHODS, method == BOTTLENECK
        entry = cls(
            name=check_name(f.str("name"), f.source, f.path("name")),
            version=f.int("version", min=1),
            file=_safe_relpath(f.str("file"), f.source, f.path("file")),
            method=method,
            rank=f.int("rank", min=1) if lora else f.int("rank", None, min=0),
            alpha=f.float("alpha", min=0.0) if lora else f.float("alpha", None, min=0.0),
            base_fingerprint=f.str("base_fingerprint"),
            task=f.str("task", "causal-lm", choices=TASKS),
            dtype=f.str("dtype", "fp32", choices=("fp32", "fp16", "int8", "int4")),
            target_modules=tuple(f.str_list("target_modules", [])),
            labels=tuple(f.str_list("labels", None)) if f.data.get("labels") is not None else None,
            review_threshold=f.float("review_threshold", None, min=0.0, max=1.0),
            virtual_tokens=f.int("virtual_tokens", min=1) if prefix else f.int("virtual_tokens", None, min=1),
            bottleneck_size=f.int("bottleneck_size", min=1) if bottleneck else f.int("bottleneck_size", None, min=1),
            activation=f.str("activation", choices=ACTIVATIONS) if bottleneck else f.str("activation", None),
            metrics=dict(f.table("metrics", {}).data),
        )
        if entry.task == "classification" and not entry.labels:
            raise f.error("labels", "a classification adapter must list its label names")
        if prefix and entry.task != "causal-lm":
            raise f.error("method", f"{method} adapters apply to decoders (causal-lm), not to {entry.task}")
        if bottleneck:
            odd = [p for p in entry.target_modules if p not in BOTTLENECK_POINTS]
            if odd or not entry.target_modules:
                raise f.error("target_modules", f"a bottleneck adapter sits at one or more of "
                              f"{', '.join(BOTTLENECK_POINTS)}, got {list(entry.target_modules)}")
        return entry

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["labels"] = list(self.labels) if self.labels is not None else None
        return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class HealthCheck:
    """An input with an expected output, run after an install; a failure rolls back.

    ``expect`` is one of ``{"contains": str}``, ``{"equals": str}`` (generated text)
    or ``{"label": str}`` (classification).
    """

    input: str
    expect: dict
    adapter: str | None = None
    max_new_tokens: int = 32

    @classmethod
    def from_fields(cls, f: Fields) -> HealthCheck:
        expect = f.table("expect")
        kinds = [k for k in ("contains", "equals", "label") if k in expect.data]
        if len(kinds) != 1:
            raise expect.error("", "must hold exactly one of contains, equals, label")
        expect.str(kinds[0])
        expect.reject_unknown()
        check = cls(input=f.str("input"), expect=dict(expect.data), adapter=f.str("adapter", None),
                    max_new_tokens=f.int("max_new_tokens", 32, min=1, max=4096))
        f.reject_unknown()
        return check


@dataclass(frozen=True)
class Signature:
    algorithm: str
    key_id: str
    value: str


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated ``manifest.json``. Build with :meth:`from_dict` / :func:`read_manifest`."""

    edgepeft_version: str
    created: str
    base: dict
    target: dict
    quantization: dict
    model: dict
    tokenizer: dict
    generation: dict
    files: tuple[FileEntry, ...]
    adapters: tuple[AdapterEntry, ...] = ()
    health_checks: tuple[HealthCheck, ...] = ()
    merged_adapter: str | None = None
    signature: Signature | None = None
    schema_version: int = MANIFEST_SCHEMA_VERSION
    kind: str = "bundle"

    @classmethod
    def from_dict(cls, data: dict, source: str = MANIFEST_NAME) -> Manifest:
        """Validate a manifest dict; raises :class:`SpecError` naming the field."""
        f = Fields(data, source)
        version = f.int("schema_version", min=1)
        if version > MANIFEST_SCHEMA_VERSION:
            raise f.error("schema_version", f"{version} is newer than this edgepeft reads "
                          f"({MANIFEST_SCHEMA_VERSION})", hint="upgrade edgepeft on the device")
        kind = f.str("kind", choices=("bundle",))
        base = f.table("base")
        base.str("name"), base.str("fingerprint"), base.str("task", choices=TASKS), base.str("architecture")
        files = []
        seen, dirs = set(), set()
        for i, item in enumerate(f.items("files")):
            ff = Fields(item, source, f"files[{i}]")
            entry = FileEntry(_safe_relpath(ff.str("path"), source, ff.path("path")),
                              ff.int("size", min=0, max=MAX_FILE_BYTES), ff.str("sha256"))
            if not is_id(entry.sha256):
                raise ff.error("sha256", "must be 64 lowercase hex digits")
            if entry.path in seen or entry.path == MANIFEST_NAME:
                raise ff.error("path", f"{entry.path!r} is listed twice or names the manifest itself")
            folders = {"/".join(entry.path.split("/")[:k]) for k in range(1, entry.path.count("/") + 1)}
            if folders & seen or entry.path in dirs:
                raise ff.error("path", f"{entry.path!r} is both a file and a folder of the bundle")
            dirs |= folders
            seen.add(entry.path)
            ff.reject_unknown()
            files.append(entry)
        adapters = tuple(AdapterEntry.from_fields(Fields(a, source, f"adapters[{i}]"))
                         for i, a in enumerate(f.items("adapters", [])))
        names = [a.name for a in adapters]
        if len(set(names)) != len(names):
            raise f.error("adapters", "two adapters share a name")
        for i, a in enumerate(adapters):
            if a.file not in seen:
                raise f.error(f"adapters[{i}].file", f"{a.file!r} is not listed in files")
        checks = tuple(HealthCheck.from_fields(Fields(c, source, f"health_checks[{i}]"))
                       for i, c in enumerate(f.items("health_checks", [])))
        for i, c in enumerate(checks):
            if c.adapter is not None and c.adapter not in names:
                raise f.error(f"health_checks[{i}].adapter", f"names unknown adapter {c.adapter!r}")
        sig = None
        if data.get("signature") is not None:
            s = f.table("signature")
            sig = Signature(s.str("algorithm", choices=("ed25519",)), s.str("key_id"), s.str("value"))
            s.reject_unknown()
        else:
            f.raw("signature", None)
        model = f.table("model")
        graph = model.str("graph")
        if graph not in seen:
            raise model.error("graph", f"{graph!r} is not listed in files")
        manifest = cls(
            edgepeft_version=f.str("edgepeft_version"), created=f.str("created"), base=dict(base.data),
            target=dict(f.table("target").data), quantization=dict(f.table("quantization").data),
            model=dict(model.data), tokenizer=dict(f.table("tokenizer").data),
            generation=dict(f.table("generation", {}).data), files=tuple(files), adapters=adapters,
            health_checks=checks, merged_adapter=f.str("merged_adapter", None), signature=sig,
            schema_version=version, kind=kind,
        )
        f.reject_unknown()
        return manifest

    def to_dict(self) -> dict:
        d = {
            "schema_version": self.schema_version, "kind": self.kind,
            "edgepeft_version": self.edgepeft_version, "created": self.created,
            "base": self.base, "target": self.target, "quantization": self.quantization,
            "model": self.model, "tokenizer": self.tokenizer, "generation": self.generation,
            "files": [asdict(x) for x in self.files],
            "adapters": [a.to_dict() for a in self.adapters],
            "health_checks": [{k: v for k, v in asdict(c).items() if v is not None} for c in self.health_checks],
            "merged_adapter": self.merged_adapter,
        }
        if self.signature is not None:
            d["signature"] = asdict(self.signature)
        return d

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise SpecError(MANIFEST_NAME, "files", f"has no entry for {path!r}")

    def adapter(self, name: str) -> AdapterEntry:
        for a in self.adapters:
            if a.name == name:
                return a
        raise SpecError(MANIFEST_NAME, "adapters", f"has no adapter named {name!r}",
                        hint=f"known: {', '.join(a.name for a in self.adapters) or 'none'}")


def canonical_bytes(data: dict) -> bytes:
    """The signed byte string: the manifest without its signature, as canonical JSON."""
    body = {k: v for k, v in data.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"key {dup!r} appears twice in one object")
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_manifest(raw: bytes, source: str) -> dict:
    """A manifest's bytes as a dict; raises :class:`SpecError` if they are not one strict JSON object.

    Strict: a key twice in one object (parsers disagree on which one wins, so a verifier in another
    language could check one value and use another) and NaN/Infinity (not JSON; the canonical
    form cannot hold them) are refused, as docs/bundle-format.md specifies.
    """
    try:
        data = loads_untrusted(bytes(raw).decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                               parse_constant=_no_constant)
    except ValueError as exc:  # also UnicodeDecodeError and too deep a nesting
        raise SpecError(source, "", f"is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(source, "(top level)", f"expected a JSON object, got {type(data).__name__}")
    return data


def read_manifest_dict(path: Path) -> dict:
    """Read a manifest file (never through a symbolic link) as a dict; raises :class:`SpecError`
    if it is missing, a link, or not one strict JSON object (see :func:`parse_manifest`)."""
    import os
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as exc:
        raise SpecError(str(path), "", "does not exist", hint="is this a bundle directory?") from exc
    except OSError as exc:
        raise SpecError(str(path), "", f"cannot be opened ({exc.strerror}); links are not allowed in bundles",
                        hint="copy the bundle again as plain files") from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > 16 << 20:
            raise SpecError(str(path), "", "is not a regular file of manifest size",
                            hint="copy the bundle again as plain files")
        raw = fh.read()
    return parse_manifest(raw, str(path))
