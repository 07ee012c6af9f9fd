"""The onnxruntime-genai peer: int4 models built from the same HF weights, with and without LoRA.

Two graphs come out of ``python -m onnxruntime_genai.models.builder``:

* ``base-int4``: the plain model (fused QKV, the builder's fastest form).
* ``lora-int4``: built with ``adapter_path=`` (the builder's LoRA path). The
  builder would quantize the LoRA matmuls to int4 and bake them in, which makes
  them unswappable, so the LoRA nodes are excluded from quantization and, after
  the build, their weights become overridable graph inputs with zero defaults
  (what Olive does for genai Multi-LoRA); the real values go to a
  ``.onnx_adapter`` file loaded at run time through genai's ``Adapters`` API.

The GGUF-derived tokenizer is made plain (no byte fallback, ByteLevel decoder)
because genai's tokenizer rejects the mix. Every session gets 2 threads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .harness import THREADS, Skip

_PROJ = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _lora_nodes(num_layers: int, targets: list[str]) -> list[str]:
    return [f"/model/layers.{i}/{_PROJ[t]}/{t}/{ab}/MatMul"
            for i in range(num_layers) for t in targets for ab in ("lora_A", "lora_B")]


def build(hf_dir: Path, out: Path, *, adapter_dir: Path | None = None, precision: str = "int4",
          log: Path | None = None, stats: dict | None = None) -> Path:
    """Build a genai model directory at ``out`` (reused if present); returns ``out``.

    ``stats``: when given, the builder runs under :func:`benchmarks.scale.measured` (a child of a fresh
    parent) and ``stats`` receives its wall seconds and peak resident memory. Raises :class:`Skip` when
    the builder is missing a dependency or fails.
    """
    if (out / "genai_config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / "hf-cache")]
    extra: list[str] = []
    if adapter_dir is not None:
        acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        ncfg = json.loads((hf_dir / "config.json").read_text())
        targets = sorted(acfg["target_modules"])
        extra += [f"adapter_path={adapter_dir}",
                  "nodes_to_exclude=" + ",".join(_lora_nodes(ncfg["num_hidden_layers"], targets))]
    if extra:
        cmd += ["--extra_options", *extra]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = log or out.with_name(out.name + ".build.log")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if stats is None:
        with open(log, "w", encoding="utf-8") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    else:
        from .scale import measured

        res = measured(cmd, env=env)
        log.write_text(res["stdout"] + res["stderr"], encoding="utf-8")
        rc = res["rc"]
        stats.update(wall_s=res["wall_s"], peak_rss_mib=res["peak_rss_mib"])
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-400:]
        raise Skip(f"onnxruntime-genai builder failed (see {log}): {tail}")
    fix_tokenizer(tmp / "tokenizer.json")
    _set_threads(tmp / "genai_config.json")
    if adapter_dir is not None:
        extract_adapter(tmp, tmp / "adapter.onnx_adapter")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def fix_tokenizer(path: Path) -> None:
    """Turn byte fallback off and use a plain ByteLevel decoder (genai refuses the GGUF mix)."""
    tok = json.loads(path.read_text(encoding="utf-8"))
    tok["model"]["byte_fallback"] = False
    tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")


def _set_threads(cfg_path: Path) -> None:
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"] = THREADS
    so["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def extract_adapter(model_dir: Path, adapter_file: Path) -> list[str]:
    """Move the LoRA weights out of ``model.onnx`` into an ``.onnx_adapter`` file.

    Each ``...lora_A/B...weight`` initializer becomes a graph input backed by a
    zero initializer of the same shape (adapter path off by default); returns
    the parameter names.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model_path = model_dir / "model.onnx"
    model = onnx.load(str(model_path), load_external_data=True)
    g = model.graph
    params: dict[str, object] = {}
    names = []
    for init in g.initializer:
        if ".lora_A." in init.name or ".lora_B." in init.name:
            arr = numpy_helper.to_array(init)
            if arr.dtype != np.float32:
                raise Skip(f"genai LoRA weight {init.name} is {arr.dtype}, not float32: builder quantized it")
            params[init.name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(arr), init.name))
            g.input.append(onnx.helper.make_tensor_value_info(init.name, onnx.TensorProto.FLOAT, list(arr.shape)))
            names.append(init.name)
    if not names:
        raise Skip("the genai LoRA build has no float LoRA initializers to extract")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    fmt.export_adapter(str(adapter_file))
    data = model_dir / "model.onnx.data"
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return names


class GenaiDecoder:
    """A genai model run greedily for exactly ``n_new`` tokens (EOS held off with min_length)."""

    def __init__(self, model_dir: Path, adapter_file: Path | None = None, max_length: int = 1024) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise Skip(f"onnxruntime-genai not installed: {exc}") from exc
        self.og = og
        self.model = og.Model(str(model_dir))
        ctx_len = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["context_length"]
        self.max_length = min(max_length, int(ctx_len))
        self.adapters = None
        if adapter_file is not None:
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter_file), "bench")

    def _generator(self, total_len: int):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, min_length=total_len, do_sample=False)
        gen = og.Generator(self.model, params)
        if self.adapters is not None:
            gen.set_active_adapter(self.adapters, "bench")
        return gen

    def run(self, ids: list[int], n_new: int) -> dict[str, float]:
        """One generation; prefill_s is time to the first new token, decode_tok_s the rest."""
        gen = self._generator(len(ids) + n_new)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        stamps = []
        for _ in range(n_new):
            gen.generate_next_token()
            gen.get_next_tokens()
            stamps.append(time.perf_counter())
        return {"prefill_s": stamps[0] - t0, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}

    def tokens(self, ids: list[int], n_new: int) -> list[int]:
        """The greedy continuation (for a correctness check against the other systems)."""
        gen = self._generator(len(ids) + n_new)
        gen.append_tokens(ids)
        out = []
        for _ in range(n_new):
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out

    def switch_s(self) -> float:
        """Seconds to create a generator and activate the loaded adapter on it."""
        if self.adapters is None:
            raise Skip("no adapter loaded")
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=64)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.set_active_adapter(self.adapters, "bench")
        return time.perf_counter() - t0
