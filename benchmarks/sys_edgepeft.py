"""edgepeft itself: bundles built with ``edgepeft.bundle.build.build_bundle`` and run by ``Engine``.

Bundles go to ``benchmarks/work/bundles/`` and are reused when present (delete
the folder to rebuild). Everything is measured through the public API
(``Engine.generate(stream=True)``, ``Engine.classify``), the same path users get.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .harness import THREADS, Skip

TARGET = str(Path(__file__).with_name("bench-host.toml"))  # the x86-64 gateway with this machine's memory


def keypair(work: Path) -> tuple[Path, Path]:
    """A signing key pair for the benchmark bundles (private, public)."""
    from edgepeft.contracts.signing import generate_keypair

    stem = work / "keys" / "bench"
    priv, pub = stem.with_suffix(".key"), stem.with_suffix(".pub")
    found = sorted((work / "keys").glob("bench*")) if (work / "keys").is_dir() else []
    if len(found) >= 2:
        privs = [p for p in found if "pub" not in p.name]
        pubs = [p for p in found if "pub" in p.name]
        if privs and pubs:
            return privs[0], pubs[0]
    stem.parent.mkdir(parents=True, exist_ok=True)
    priv, pub = generate_keypair(stem, force=True)
    return Path(priv), Path(pub)


def _stamp(base: str | None, adapters: list[tuple[str, Path]], quant: str, merge: str | None, dtype: str,
           *options) -> str:
    """What a cached bundle depends on: the build code, the base's and the adapters' files, the options.

    A bundle built by older exporter code, from a base rewritten or an adapter retrained since,
    is rebuilt instead of silently measured.
    """
    h = hashlib.sha256(json.dumps([base, [n for n, _ in adapters], quant, merge, dtype, *options]).encode())
    pkg = Path(edgepeft_root())
    for sub in ("export", "bundle", "contracts", "models"):  # models/: base loading and the architecture table
        for f in sorted((pkg / sub).rglob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    h.update(Path(TARGET).read_bytes())
    if base and Path(base).is_dir():  # a base rewritten in place (benchmarks.scale's random models) is another base
        for f in sorted(Path(base).glob("*.json")) + sorted(Path(base).glob("*.safetensors")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for _, d in adapters:
        for f in sorted(Path(d).glob("adapter_*")) + sorted(Path(d).glob("edgepeft_*.json")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def edgepeft_root() -> str:
    import edgepeft

    return str(Path(edgepeft.__file__).parent)


def build(work: Path, name: str, *, base: str | None, adapters: list[tuple[str, Path]], quant: str,
          task: str = "causal-lm", merge: str | None = None, adapter_dtype: str = "fp32", gguf: str = "keep",
          lora_b: str = "auto", zero_points: str = "all", log: Callable[[str], None] = print,
          child: bool = False) -> Path:
    """Build (or reuse) bundle ``work/bundles/<name>``; raises :class:`Skip` if edgepeft cannot yet.

    Reused only while its stamp (build code + adapters + options) is unchanged. ``child``: build in a
    child process, so a build that loads the whole base (a merged adapter) leaves this process's memory
    as it was.
    """
    out = work / "bundles" / name
    stamp_file = out.with_name(name + ".stamp")
    try:
        stamp = _stamp(base, adapters, quant, merge, adapter_dtype, gguf, lora_b, zero_points)
    except OSError as exc:
        raise Skip(f"cannot read the inputs of bundle {name}: {exc}") from exc
    if (out / "manifest.json").is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return out
    try:
        from edgepeft.bundle.build import build_bundle
    except ImportError as exc:
        raise Skip(f"edgepeft.bundle.build is not importable yet: {exc}") from exc
    priv, _ = keypair(work)
    log(f"  building bundle {name} ({quant}{', merged ' + merge if merge else ''}, {len(adapters)} adapters)")
    t0 = time.perf_counter()
    kwargs = dict(base=base, adapters=[(n, str(p)) for n, p in adapters], target=TARGET, key=str(priv),
                  out=str(out), quant=quant, merge=merge, adapter_dtype=adapter_dtype, task=task, force=True,
                  gguf=gguf, lora_b=lora_b, zero_points=zero_points)
    try:
        if child:
            _build_in_child(kwargs)
        else:
            build_bundle(**kwargs)
    except Exception as exc:  # report any failure of the code under test as a skip with its message
        shutil.rmtree(out, ignore_errors=True)
        raise Skip(f"edgepeft build of {name} failed: {type(exc).__name__}: {exc}") from exc
    log(f"  built {name} in {time.perf_counter() - t0:.0f} s")
    stamp_file.write_text(stamp)
    return out


_CHILD_BUILD = "import json, sys; from edgepeft.bundle.build import build_bundle; build_bundle(**json.loads(sys.argv[1]))"


def _build_in_child(kwargs: dict) -> None:
    """``build_bundle(**kwargs)`` in a fresh interpreter; raises RuntimeError with its last lines if it fails."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _CHILD_BUILD, json.dumps(kwargs)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(" | ".join(proc.stderr.strip().splitlines()[-3:])[-600:])


def write_adapter_file(bundle: Path, peft_dir: Path, out: Path, dtype: str) -> Path:
    """An adapter file for ``bundle``'s graph in payload ``dtype`` (fp32, fp16, int8); rewritten every run."""
    from edgepeft.export import write_adapter

    manifest = json.loads((bundle / "manifest.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    write_adapter(peft_dir, manifest["model"], out, dtype=dtype)
    return out


class EdgeDecoder:
    """An edgepeft Engine on a decoder bundle; ``adapter`` names the adapter each request uses."""

    def __init__(self, bundle: Path, pub: Path, adapter: str | None = None) -> None:
        try:
            from edgepeft.runtime.engine import Engine
        except ImportError as exc:
            raise Skip(f"edgepeft.runtime.engine is not importable yet: {exc}") from exc
        # every repetition sends the same prompt: with a prompt cache, prefill would time one token, not the
        # prompt the peers prefill (section 11's server keeps its cache: its requests ask different questions)
        self.engine = Engine(bundle, [pub], threads=THREADS, prompt_cache_mb=0)
        self.adapter = adapter

    def run_text(self, text: str, n_new: int, adapter: str | None = "__default__") -> dict[str, float]:
        """One greedy generation of up to ``n_new`` tokens (stops early only at EOS)."""
        adapter = self.adapter if adapter == "__default__" else adapter
        t0 = time.perf_counter()
        stream = self.engine.generate(text, adapter=adapter, max_new_tokens=n_new, temperature=0.0, stream=True)
        stamps = []
        for _ in stream:
            stamps.append(time.perf_counter())
        res = stream.result
        n = len(res.token_ids)
        if n < 8 or len(stamps) < 2:
            raise Skip(f"edgepeft generated only {n} tokens (EOS): cannot time decode")
        return {"prefill_s": stamps[0] - t0, "decode_tok_s": (n - 1) / (stamps[-1] - stamps[0]),
                "tokens": n}

    def tokens(self, text: str, n_new: int) -> list[int]:
        res = self.engine.generate(text, adapter=self.adapter, max_new_tokens=n_new, temperature=0.0)
        return list(res.token_ids)


class EdgeClassifier:
    """An edgepeft Engine on a classification bundle."""

    def __init__(self, bundle: Path, pub: Path, adapter: str | None) -> None:
        try:
            from edgepeft.runtime.engine import Engine
        except ImportError as exc:
            raise Skip(f"edgepeft.runtime.engine is not importable yet: {exc}") from exc
        self.engine = Engine(bundle, [pub], threads=THREADS)
        self.adapter = adapter

    def run(self, texts: list[str]) -> dict[str, float]:
        t0 = time.perf_counter()
        self.engine.classify(texts, adapter=self.adapter)
        return {"samples_per_s": len(texts) / (time.perf_counter() - t0)}
