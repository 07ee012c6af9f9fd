"""Merge mode: fold one LoRA adapter into the base weights before quantization.

For a single-task device: the graph then has no slots (the fastest graph),
and quantization sees the merged weights, exactly as PEFT's
``merge_and_unload`` would produce them.
"""

from __future__ import annotations

import numpy as np

from ..errors import AdapterError
from .peft_reader import read_peft_lora


def merge_into(sd: dict, peft_dir, *, task: str) -> dict:
    """Return ``(merged copy of sd, parsed adapter)``; ``sd`` maps HF names to float32 numpy.

    ``W += scaling * B @ A`` for every LoRA module; a classification adapter's
    saved head (``classifier.*``, and any other saved module such as
    DistilBERT's ``pre_classifier``) replaces the base's. Raises :class:`AdapterError` when a
    module or shape does not exist in the base.
    """
    lora = read_peft_lora(peft_dir)
    out = dict(sd)
    for module, (a, b, scaling) in lora.modules.items():
        key = module + ".weight"
        if key not in out:
            raise AdapterError(f"{lora.path.name}: adapter trains {module}, which the base does not have",
                               hint="the adapter was trained for a different base")
        w = out[key]
        if w.shape != (b.shape[0], a.shape[1]):
            raise AdapterError(f"{lora.path.name}: {module} delta is {b.shape[0]}x{a.shape[1]}, base is {w.shape}",
                               hint="the adapter was trained for a different base")
        out[key] = (w.astype(np.float64) + scaling * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)
    for name, arr in lora.saved.items():
        if task == "classification" and name.startswith("classifier."):  # its own label count
            out[name] = arr.astype(np.float32)
        elif name in out and out[name].shape == arr.shape:
            out[name] = arr.astype(np.float32)  # modules_to_save (e.g. lm_head) replace the base module
        else:
            raise AdapterError(f"{lora.path.name}: saved module tensor {name} does not fit the base",
                               hint="the adapter was trained for a different base")
    if task == "classification" and not any(k.startswith("classifier.") for k in lora.saved):
        raise AdapterError(f"{lora.path.name}: a classification adapter must carry its head to be merged",
                           hint="train with task_type=SEQ_CLS")
    return out, lora
