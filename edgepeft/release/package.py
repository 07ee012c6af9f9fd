"""``edgepeft update create``: one signed update package (.epu) for devices that run a bundle.

Two kinds, one format (:mod:`edgepeft.contracts.update`):

- an adapter update: a new version of one adapter for the base a bundle carries.
  The adapter file comes from the same exporter as ``edgepeft build``'s, and is
  checked against the bundle's slots, rank limit, task and base fingerprint
  before anything is signed: an adapter that does not fit is refused here, with
  the reason, not on a thousand devices.
- a bundle update: a whole new bundle (a new base), delivered as its ``.epb``
  archive. Devices install it beside the old base and switch atomically.

Everything cheap is checked first; the output file is written atomically.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..contracts.manifest import MANIFEST_NAME, Manifest, read_manifest_dict
from ..contracts.names import check_name, sha256_file
from ..contracts.update import (
    KIND,
    SUFFIX,
    UPDATE_SCHEMA_VERSION,
    UpdateMeta,
    encode_envelope,
    format_time,
    metadata_bytes,
    utc_now,
)
from ..errors import AdapterError, BuildError, UsageError
from ..fsio import atomic_path

# The first edgepeft whose devices read update packages; a package never asks for less.
MIN_RUNTIME = "0.2.0"
_DURATION = re.compile(r"\s*(\d+)\s*([smhdw])\s*")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass
class UpdateResult:
    """What was written: the package, its id, and its metadata."""

    path: Path
    id: str
    meta: dict
    bytes: int
    warnings: list = field(default_factory=list)  # e.g. the bundle was signed by another key

    def summary(self) -> dict:
        m = self.meta
        return {"update": str(self.path), "id": self.id, "bytes": self.bytes, "type": m["type"],
                "name": (m.get("adapter") or {}).get("name", "bundle"),
                "version": (m.get("adapter") or m.get("bundle"))["version"],
                "base_fingerprint": m["base_fingerprint"], "expires": m.get("expires"),
                "payload_bytes": m["payload"]["size"], "health_checks": len(m.get("health_checks", [])),
                "warnings": list(self.warnings)}


def parse_expiry(text: str | None, now: _dt.datetime | None = None) -> str | None:
    """``"30d"``/``"12h"``/``"2w"``, an ISO time ``2026-12-31T00:00:00Z``, or ``"never"`` -> metadata form."""
    if text is None or str(text).lower() == "never":
        return None
    now = now or utc_now()
    m = _DURATION.fullmatch(str(text))
    if m:
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
        if seconds <= 0:
            raise UsageError(f"--expires {text!r} is not in the future", hint="e.g. --expires 30d")
        return format_time(now + _dt.timedelta(seconds=seconds))
    try:
        when = _dt.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.UTC)
    except ValueError as exc:
        raise UsageError(f"--expires {text!r} is neither a duration nor a UTC time",
                         hint="e.g. --expires 30d, --expires 12h, or --expires 2026-12-31T00:00:00Z") from exc
    if when <= now:
        raise UsageError(f"--expires {text} is in the past", hint="choose a later time")
    return format_time(when)


def read_bundle_manifest(bundle_dir: Path) -> Manifest:
    """The manifest of a bundle directory on the build server (parsed, not trusted for anything but facts)."""
    if not (Path(bundle_dir) / MANIFEST_NAME).is_file():
        raise UsageError(f"{bundle_dir} is not a bundle directory (no {MANIFEST_NAME})",
                         hint="pass the directory `edgepeft build --out` wrote")
    path = Path(bundle_dir) / MANIFEST_NAME
    return Manifest.from_dict(read_manifest_dict(path), str(path))


def _sign_and_write(meta: dict, payload: Path, key, out: Path, verify=None) -> UpdateResult:
    """Sign ``meta``; ``verify(package bytes)`` may refuse it (raising) before anything is written."""
    from ..contracts.signing import load_private_key, sign_bytes

    private_key = key if not isinstance(key, (str, os.PathLike)) else load_private_key(key)
    UpdateMeta.from_dict(meta, str(out))  # what we sign must parse on a device
    body = metadata_bytes(meta)
    envelope = encode_envelope(body, [sign_bytes(body, private_key)])
    if verify is not None:
        verify(envelope + payload.read_bytes())
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, mode=0o644) as tmp, open(tmp, "wb") as fh, open(payload, "rb") as src:
        fh.write(envelope)  # readable 0644: a release file is meant to be served
        shutil.copyfileobj(src, fh, 1 << 20)
    from ..contracts.names import sha256_bytes

    return UpdateResult(path=out, id=sha256_bytes(envelope), meta=meta, bytes=out.stat().st_size)


def _common(kind: str, *, base_fingerprint: str, payload: Path, fmt: str, expires, health_checks: list,
            min_runtime: str | None) -> dict:
    return {"schema_version": UPDATE_SCHEMA_VERSION, "kind": KIND, "type": kind,
            "created": format_time(utc_now()), "expires": parse_expiry(expires),
            "min_runtime": min_runtime or MIN_RUNTIME, "base_fingerprint": base_fingerprint,
            "payload": {"size": payload.stat().st_size, "sha256": sha256_file(payload), "format": fmt},
            "health_checks": health_checks}


def _check_out(out) -> Path:
    out = Path(out)
    if out.suffix != SUFFIX:
        raise UsageError(f"--out {out} should end in {SUFFIX}", hint=f"e.g. --out northwind-v2{SUFFIX}")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory", hint=f"name a file, e.g. {out / ('update' + SUFFIX)}")
    return out


def create_adapter_update(*, bundle: str | os.PathLike, name: str, adapter: str | os.PathLike, version: int,
                          key, out: str | os.PathLike, expires: str | None = "30d", health_checks=None,
                          adapter_dtype: str | None = None, min_runtime: str | None = None,
                          progress=lambda msg: None) -> UpdateResult:
    """Export ``adapter`` (a PEFT directory) for ``bundle``'s base (its directory or ``.epb``) and write a
    signed update package, after running the health checks a device will run on it.

    Raises :class:`UsageError` (bad options), :class:`AdapterError` (the adapter does not fit the
    bundle's base: another base, task, modules, a rank above the limit), :class:`SignatureError` (key),
    :class:`BuildError` (a health check fails: nothing is written).
    """
    if Path(bundle).is_file():  # the .epb archive every other command takes
        import shutil

        from ..contracts.archive import unpack_bundle

        tmp = Path(tempfile.mkdtemp(prefix=".update-bundle-"))
        try:
            return create_adapter_update(bundle=unpack_bundle(Path(bundle), tmp / Path(bundle).stem), name=name,
                                         adapter=adapter, version=version, key=key, out=out, expires=expires,
                                         health_checks=health_checks, adapter_dtype=adapter_dtype,
                                         min_runtime=min_runtime, progress=progress)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    from ..bundle.adapters_in import read_adapter
    from ..bundle.entries import adapter_entry
    from ..contracts.checks import read_health_checks
    from ..contracts.signing import load_private_key

    out = _check_out(out)
    check_name(name, "--adapter", "NAME")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UsageError(f"--version {version!r} must be a whole number >= 1",
                         hint="versions only go up: use the last published version + 1")
    private_key = load_private_key(key)
    manifest = read_bundle_manifest(Path(bundle))
    model = manifest.model
    if manifest.merged_adapter or not model.get("slots"):
        raise AdapterError(f"bundle {bundle} is a merged single-task bundle: it has no adapter slots",
                           hint="build a slots bundle (edgepeft build without --merge) to ship adapter updates")
    a = read_adapter(name, Path(adapter), version=version)
    fingerprint = manifest.base["fingerprint"]
    task = manifest.base.get("task", "causal-lm")
    if a.task != task:
        raise AdapterError(f"adapter {name!r} is a {a.task} adapter; bundle {bundle} runs a {task} model",
                           hint="create the update against a bundle of the same task")
    if a.base_fingerprint and a.base_fingerprint != fingerprint:
        raise AdapterError(f"adapter {name!r} was trained on a different base ({a.base_fingerprint[:19]}...) than "
                           f"bundle {bundle} carries ({fingerprint[:19]}...)",
                           hint="train it on the bundle's base, or ship a bundle update with the new base")
    slot_rank = int(model.get("slot_rank") or 0)
    if a.method == "lora":
        _check_lora_fits(a, manifest, bundle, slot_rank)
    context = int(min(x for x in ((manifest.generation or {}).get("max_context"), model.get("max_context")) if x))
    if a.method in ("prefix-tuning", "prompt-tuning") and a.virtual_tokens + 2 > context:
        raise AdapterError(f"adapter {name!r} puts {a.virtual_tokens} virtual tokens before every prompt; bundle "
                           f"{bundle} holds {context} tokens", hint="train it with far fewer --virtual-tokens")
    dtype = adapter_dtype or (manifest.quantization or {}).get("adapter_dtype", "fp32")
    checks = read_health_checks(health_checks)
    notes = other_key(manifest, private_key, bundle)
    from .. import export as export_api
    from ..runtime.adapter_file import read_logical_header
    from ..runtime.slots import GraphFacts, check_entry, parse_slots

    work = Path(tempfile.mkdtemp(prefix=".update-", dir=out.parent if out.parent.exists() else None))
    try:
        rel = f"adapters/{name}-{version}.onnx_adapter"
        progress(f"exporting adapter {name} v{version} ({a.method}, {dtype}) for {manifest.base.get('name')}")
        graph = _bundle_graph(Path(bundle), manifest, work) if a.method == "prompt-tuning" else None
        info = export_api.write_adapter(a.path, model, work / "payload.onnx_adapter", dtype=dtype, name=name,
                                        version=version, labels=a.labels, pad=False, graph_path=graph)
        entry = adapter_entry(a, file=rel, fingerprint=fingerprint, dtype=dtype, labels=info.labels)
        header = read_logical_header(work / "payload.onnx_adapter")  # int4 parts as the tensors they expand to
        check_entry(header, entry, slots=parse_slots(model), base_fingerprint=fingerprint, slot_rank=slot_rank,
                    task=task, source=f"adapter {name!r}", facts=GraphFacts.from_model(model, context), compact=True)
        meta = _common("adapter", base_fingerprint=fingerprint, payload=work / "payload.onnx_adapter",
                       fmt="onnx_adapter", expires=expires, health_checks=checks, min_runtime=min_runtime)
        meta["adapter"] = entry
        meta["slots"] = sorted(p for p in header.params if not p.endswith(".scale"))
        from ..runtime.health import checks_for

        # what a device runs on install: the package's checks, else the bundle's own for this adapter
        run = checks or checks_for(manifest.health_checks, name)
        where = str(health_checks) if checks else \
            f"the bundle's checks for {name}, which a device runs when a package has none: pass --health-check " \
            "with checks for this version"

        def verify(data: bytes) -> None:
            if run and not notes:  # a bundle signed by another key does not open with ours
                from ..bundle.health import check_package

                progress(f"running {len(run)} health check(s) on {name} v{version} in bundle {Path(bundle).name}")
                check_package(Path(bundle), private_key.public_key(), data, name, run,
                              what=f"update {name} v{version}", where=where)
        progress(f"signing {out.name}")
        result = _sign_and_write(meta, work / "payload.onnx_adapter", private_key, out, verify=verify)
        result.warnings += notes
        return result
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def other_key(manifest: Manifest, private_key, bundle) -> list[str]:
    """A warning when ``bundle`` was signed by another key than the one signing the update: devices that
    trust only the bundle's key will refuse the package."""
    from ..contracts.verify import key_id

    ours = key_id(private_key.public_key())
    theirs = manifest.signature.key_id if manifest.signature else None
    if theirs is None or theirs == ours:
        return []
    return [f"bundle {bundle} was signed by key {theirs}; this package is signed by key {ours}: devices that run "
            f"the bundle trust {theirs} and will refuse it unless {ours} is also among their trusted keys "
            "(sign with the bundle's key, or provision the new key first); its health checks were not run here"]


def _check_lora_fits(a, manifest: Manifest, bundle, slot_rank: int) -> None:
    """A LoRA adapter's rank and modules against the bundle's slots; raises :class:`AdapterError`."""
    limit = int(((manifest.target or {}).get("budgets") or {}).get("max_adapter_rank") or slot_rank)
    if a.rank > slot_rank or a.rank > limit:
        raise AdapterError(f"adapter {a.name!r} has rank {a.rank}; bundle {bundle} takes ranks up to "
                           f"{min(slot_rank, limit)}", hint="retrain with a smaller --rank, or rebuild the bundle")
    from ..export.slots import missing_targets

    exported = set(manifest.model.get("target_modules") or [])
    missing = missing_targets(a.target_modules, exported) if exported else []
    if missing:
        raise AdapterError(f"adapter {a.name!r} trains {', '.join(missing)}, which bundle {bundle} has no slots for "
                           f"(it has {', '.join(sorted(exported))})",
                           hint="rebuild the bundle with this adapter (edgepeft build --adapter), so its graph gets "
                                "these slots, or retrain the adapter on the bundle's modules")


def _bundle_graph(bundle: Path, manifest: Manifest, work: Path) -> Path:
    """The bundle's model.onnx, copied into ``work`` from bytes checked against the manifest's SHA-256: a
    prompt-tuning soft prompt is compiled by exactly the graph the devices run. Raises :class:`BuildError`."""
    from ..contracts.verify import read_verified
    from ..errors import IntegrityError

    entry = manifest.file(manifest.model.get("graph", "model.onnx"))
    try:
        data = read_verified(bundle, entry)
    except IntegrityError as exc:
        raise BuildError(f"bundle {bundle}: {exc.message}", hint="rebuild the bundle, or restore its model.onnx") from exc
    path = work / "model.onnx"
    path.write_bytes(data)
    return path


def create_bundle_update(*, bundle: str | os.PathLike, version: int, key, out: str | os.PathLike,
                         expires: str | None = "30d", health_checks=None, min_runtime: str | None = None,
                         progress=lambda msg: None) -> UpdateResult:
    """A signed package that carries a whole new bundle (its ``.epb`` archive): a new base.

    ``bundle`` is a bundle directory (packed here) or its ``.epb``. The bundle keeps its own
    signed manifest; the device verifies both. Before signing, the checks a device runs on install
    (the bundle's own and ``health_checks``) run here on the archive being shipped, so an expectation
    that cannot hold is refused now instead of rolling back on every device; they are skipped, with a
    warning, when the bundle was signed by another key (it does not open with ours). Raises
    :class:`UsageError` or :class:`BuildError` (also for a failing check: nothing is written).
    """
    from ..contracts.checks import read_health_checks
    from ..contracts.signing import load_private_key

    out = _check_out(out)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UsageError(f"--version {version!r} must be a whole number >= 1",
                         hint="bundle versions only go up: use the last published one + 1")
    private_key = load_private_key(key)
    src = Path(bundle)
    work = Path(tempfile.mkdtemp(prefix=".update-", dir=out.parent if out.parent.exists() else None))
    try:
        if src.is_dir():
            manifest = read_bundle_manifest(src)
            from ..bundle.archive import pack_bundle

            progress(f"packing {src}")
            archive = pack_bundle(src, work / "bundle.epb")
        elif src.is_file():
            from ..contracts.archive import unpack_bundle

            manifest = read_bundle_manifest(unpack_bundle(src, work / "unpacked"))
            archive = src
        else:
            raise UsageError(f"{src} is neither a bundle directory nor an .epb archive",
                             hint="pass what `edgepeft build --out` wrote")
        if manifest.signature is None:
            raise BuildError(f"bundle {src} is not signed", hint="build it with `edgepeft build --key KEY`")
        fingerprint = manifest.base["fingerprint"]
        checks = read_health_checks(health_checks)
        meta = _common("bundle", base_fingerprint=fingerprint, payload=archive, fmt="epb", expires=expires,
                       health_checks=checks, min_runtime=min_runtime)
        meta["bundle"] = {"name": str(manifest.base.get("name")), "version": version, "fingerprint": fingerprint}
        notes = other_key(manifest, private_key, src)
        run = list(manifest.health_checks) + checks  # what a device runs before it commits the new bundle
        if run and not notes:
            from ..bundle.health import check_bundle

            progress(f"running {len(run)} health check(s) on bundle {src.name}")
            check_bundle(Path(archive), private_key.public_key(), run, what=f"bundle update v{version}",
                         where=f"{health_checks} or the bundle's own checks" if checks else
                         f"the bundle's own checks (rebuild {src.name} with --health-check checks that hold)")
        progress(f"signing {out.name}")
        result = _sign_and_write(meta, archive, private_key, out)
        result.warnings += notes
        return result
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


__all__ = ["UpdateResult", "create_adapter_update", "create_bundle_update", "parse_expiry", "MIN_RUNTIME",
           "__version__"]
