"""The PyTorch peer: transformers ``generate`` in fp32 and sequence classification.

Decode timing uses a streamer that stamps each token as ``generate`` emits it,
so prefill (time to first token) and decode (tokens after the first) come from
the very same call, with no change to how ``generate`` works.
"""

from __future__ import annotations

import time
from pathlib import Path

from .harness import THREADS


class _Stamps:
    """A transformers streamer that records when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class TorchDecoder:
    """transformers + PyTorch fp32 greedy ``generate`` (optionally with a PEFT adapter, unmerged)."""

    def __init__(self, model_dir: Path, adapter_dir: Path | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(THREADS)
        self.torch = torch
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir)
        self.model = model.eval()
        self.pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def run(self, ids: list[int], n_new: int) -> dict[str, float]:
        """One greedy generation of exactly ``n_new`` tokens; returns prefill_s and decode_tok_s."""
        torch = self.torch
        x = torch.tensor([ids], dtype=torch.long)
        stamps = _Stamps()
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                                min_new_tokens=n_new, do_sample=False, streamer=stamps,
                                pad_token_id=self.pad)
        return _timing(t0, stamps.times)

    def tokens(self, ids: list[int], n_new: int) -> list[int]:
        """The greedy continuation (for the cross-system agreement check)."""
        torch = self.torch
        with torch.inference_mode():
            out = self.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n_new, min_new_tokens=n_new,
                                      do_sample=False, pad_token_id=self.pad)
        return out[0, len(ids):].tolist()

    def logits(self, ids: list[int]):
        """Logits (numpy [seq, vocab]) for one window, for perplexity."""
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], dtype=torch.long))
        return out.logits[0].float().numpy()


def _timing(t0: float, stamps: list[float]) -> dict[str, float]:
    if len(stamps) < 2:
        raise RuntimeError("generation produced fewer than 2 tokens; cannot time decode")
    return {"prefill_s": stamps[0] - t0, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


class TorchClassifier:
    """transformers + PyTorch fp32 sequence classification (MiniLM with a 2-label head)."""

    def __init__(self, model_dir: Path, num_labels: int = 2) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(THREADS)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=num_labels, dtype=torch.float32).eval()

    def run(self, texts: list[str]) -> dict[str, float]:
        """Classify ``texts`` as one batch (tokenizing included); returns samples_per_s."""
        torch = self.torch
        t0 = time.perf_counter()
        enc = self.tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode():
            self.model(**enc).logits.argmax(-1).tolist()
        return {"samples_per_s": len(texts) / (time.perf_counter() - t0)}
