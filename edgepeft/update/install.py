"""Installing adapter updates on a running engine: check, store, switch, health-check, roll back.

Order: the adapter is checked against this base (fingerprint, slots, rank)
before a byte is written; the store writes it beside the old version and
switches atomically; the engine swaps it in (running requests finish on the old
one) and runs the health-check set. Any failed check switches the store back,
puts the previous version back into service and raises :class:`StoreError`
with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import AdapterError, EngineError, StoreError
from ..runtime.adapter_file import read_header
from ..runtime.registry import check_adapter


def _field(check, name, default=None):
    return check.get(name, default) if isinstance(check, dict) else getattr(check, name, default)


def run_health_checks(engine, checks: Sequence, adapter: str | None) -> list[str]:
    """Run ``checks`` (spec ``HealthCheck`` objects or dicts: input, expect, max_new_tokens)
    with ``adapter``; return one message per failure (empty when all pass)."""
    failures = []
    for i, c in enumerate(checks):
        text, expect = _field(c, "input"), dict(_field(c, "expect") or {})
        try:
            if "label" in expect:
                got = engine.classify([text], adapter=adapter)[0].label
                ok = got == expect["label"]
                want = f"label {expect['label']!r}"
            else:
                kw = {"messages": [{"role": "user", "content": text}]} if engine.codec.chat_template else {"prompt": text}
                got = engine.generate(**kw, adapter=adapter, temperature=0.0,
                                      max_new_tokens=int(_field(c, "max_new_tokens", 32) or 32)).text
                if "equals" in expect:
                    ok, want = got.strip() == expect["equals"].strip(), f"exactly {expect['equals']!r}"
                else:
                    ok, want = expect.get("contains", "") in got, f"text containing {expect.get('contains')!r}"
        except (EngineError, AdapterError) as exc:
            ok, got, want = False, f"error: {exc.message}", "an answer"
        if not ok:
            failures.append(f"check #{i} ({text[:40]!r}): expected {want}, got {str(got)[:80]!r}")
    return failures


def install_with_checks(engine, path: Path, entry, checks: Sequence, sha256: str | None):
    """See :meth:`Engine.install_adapter`."""
    if engine.store is None:
        raise StoreError("this engine has no adapter store", hint="open the Engine with store=DIR to install updates")
    meta = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
    name, version = meta.get("name"), meta.get("version")
    if not name or version is None:
        raise AdapterError("the update's adapter entry needs a name and a version", hint="rebuild the update")
    if not Path(path).is_file():
        raise StoreError(f"adapter file {path} does not exist", hint="check the update's path")
    path = Path(path)
    if sha256 is not None:
        from .store import sha256_file

        if sha256_file(path) != sha256:
            raise StoreError(f"adapter file {path.name} does not match the sha256 of its update",
                             hint="the file was corrupted or tampered with in transit; fetch it again")
        sha256 = None
    scratch = None
    if compact_payload(read_header(path)):
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix=".expand-", dir=engine.store.root))
        path = expand_payload(path, scratch / path.name)
    try:
        return _install(engine, path, meta, name, version, checks, sha256)
    finally:
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)


def compact_payload(header) -> bool:
    """True for fp16/int8 adapter payloads, which must be expanded to the graph's fp32 slots."""
    return any(p.dtype != "tensor(float)" for p in header.params.values())


def expand_payload(src: Path, dst: Path) -> Path:
    """Expand an fp16/int8 adapter file to fp32 (``edgepeft.spec.adapter_payload``); AdapterError if invalid."""
    from ..spec.adapter_payload import expand_adapter

    try:
        expand_adapter(src, dst)
    except Exception as exc:  # ValueError or onnxruntime's errors
        raise AdapterError(f"adapter {Path(src).name} has a compact payload that cannot be expanded: {exc}",
                           hint="re-export the adapter") from exc
    return dst


def _install(engine, path: Path, meta: dict, name: str, version, checks: Sequence, sha256: str | None):
    # refuse an adapter for another base before writing anything
    check_adapter(read_header(path), meta, slots=engine.registry.slots, base_fingerprint=engine.base_fingerprint,
                  slot_rank=engine.registry.slot_rank, task=engine.task, source=f"adapter {name!r} ({Path(path).name})")
    mine = [c for c in checks if _field(c, "adapter") in (None, name)]
    with engine._install_lock:
        before = engine.registry.peek(name)

        def check(stored):
            new = engine.registry.load(stored.path, dict(meta, sha256=stored.sha256), name=name, replace=True)
            failures = run_health_checks(engine, mine, name)
            if failures:
                raise EngineError("; ".join(failures))
            if before is not None and engine.runner is not None:
                engine.runner.drop_adapter(before.key)
            return new

        try:
            stored = engine.store.install(name, str(version), path, meta=dict(meta), sha256=sha256, health_check=check)
        except StoreError:
            current = engine.registry.peek(name)
            if before is not None:
                engine.registry.put(before)
            elif current is not None:
                engine.registry.unload(name)
            if current is not None and current is not before and engine.runner is not None:
                engine.runner.drop_adapter(current.key)
            raise
        return engine.registry.get(name).describe() | {"stored": str(stored.path)}


def rollback(engine, name: str, reason: str):
    """See :meth:`Engine.rollback_adapter`."""
    if engine.store is None:
        raise StoreError("this engine has no adapter store", hint="open the Engine with store=DIR")
    with engine._install_lock:
        old = engine.registry.peek(name)
        if engine.store.previous(name) is None and engine.store.current(name) is not None and \
                any(a.name == name for a in engine.manifest.adapters):
            # the version before the first installed update is the one the bundle carries
            engine.store.remove(name)
            entry = engine.manifest.adapter(name)
            meta = entry.to_dict() | {"sha256": "sha256:" + engine.manifest.file(entry.file).sha256}
            engine.registry.load(engine.bundle_dir / entry.file, meta, name=name, replace=True)
        else:
            stored = engine.store.rollback(name, reason)
            engine.registry.load(stored.path, dict(stored.meta, sha256=stored.sha256), name=name, replace=True)
        if old is not None and engine.runner is not None:
            engine.runner.drop_adapter(old.key)
        return engine.registry.get(name).describe()
