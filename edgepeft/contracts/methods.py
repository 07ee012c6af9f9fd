"""The adapter families a bundle or update may carry, and how each one's file is laid out.

One contract for the server (exporter, packager) and the device (registry, decoder loop):

- ``lora``: low-rank slots of the graph (``layers.{i}.{group}.lora_A`` / ``lora_B``, see
  :mod:`edgepeft.export.slots`); scaling folded in.
- ``bottleneck``: a small down-projection, non-linearity and zero-initialised up-projection
  added with a residual to a block's output (Houlsby et al. 2019; Pfeiffer et al. 2020).
  Slots per point and layer: ``layers.{i}.{point}.bottleneck.down.weight`` [hidden, size],
  ``.down.bias`` [size], ``.up.weight`` [size, hidden], ``.up.bias`` [hidden]; the graph
  computes ``h + (act(h @ down.weight + down.bias) @ up.weight + up.bias)``. The empty
  defaults (size 0, up.bias zeros) make every point the identity.
- ``prefix-tuning`` and ``prompt-tuning``: the initial key/value cache of a request,
  ``prefix.{i}.key`` / ``prefix.{i}.value`` [kv_heads, virtual_tokens, head_dim] per layer.
  The request's tokens take the positions after it (masks and rotary positions start at
  ``virtual_tokens``), as PEFT runs them. Prefix tuning trains that cache directly; a prompt
  tuning soft prompt is compiled into it on the server, by the very graph the device runs.

Every family travels in the same ``.onnx_adapter`` container (verified by SHA-256, read
memory-mapped), with the same manifest/update entry; ``method`` says which family it is.
Torch-free and numpy-free.
"""

from __future__ import annotations

LORA = "lora"
BOTTLENECK = "bottleneck"
PREFIX_TUNING = "prefix-tuning"
PROMPT_TUNING = "prompt-tuning"
METHODS = (LORA, PREFIX_TUNING, PROMPT_TUNING, BOTTLENECK)
PREFIX_METHODS = (PREFIX_TUNING, PROMPT_TUNING)  # applied as an initial key/value cache

# where a bottleneck adapter can sit: the output of the attention block and of the MLP block, before each
# joins the residual stream
BOTTLENECK_POINTS = ("attn_out", "mlp_out")
PLACEMENTS = {"houlsby": ("attn_out", "mlp_out"), "pfeiffer": ("mlp_out",)}
ACTIVATIONS = ("relu", "silu", "gelu")

PREFIX_PREFIX = "prefix."
BOTTLENECK_TAG = ".bottleneck."
BOTTLENECK_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


def prefix_names(layer: int) -> tuple[str, str]:
    """The key and value tensor names of one layer's prefix (``prefix.3.key``, ``prefix.3.value``)."""
    return f"{PREFIX_PREFIX}{layer}.key", f"{PREFIX_PREFIX}{layer}.value"


def bottleneck_names(point: str, layer: int | None) -> dict[str, str]:
    """Part -> slot name of one bottleneck point (``layers.3.mlp_out.bottleneck.down.weight`` ...)."""
    where = point if layer is None else f"layers.{layer}.{point}"
    return {part: f"{where}{BOTTLENECK_TAG}{part}" for part in BOTTLENECK_PARTS}


def describe_size(method: str, entry: dict) -> str:
    """A short human description of an adapter's size, e.g. ``r=8``, ``20 virtual tokens``, ``size 36 (relu)``."""
    if method in PREFIX_METHODS:
        return f"{entry.get('virtual_tokens')} virtual tokens"
    if method == BOTTLENECK:
        points = ", ".join(entry.get("target_modules") or [])
        return f"size {entry.get('bottleneck_size')} ({entry.get('activation')}) at {points}"
    return f"r={entry.get('rank')}"


__all__ = ["LORA", "BOTTLENECK", "PREFIX_TUNING", "PROMPT_TUNING", "METHODS", "PREFIX_METHODS", "BOTTLENECK_POINTS",
           "PLACEMENTS", "ACTIVATIONS", "prefix_names", "bottleneck_names", "describe_size"]
