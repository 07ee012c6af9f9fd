"""What a bundle manifest or an update package says about one adapter, built in one place.

``edgepeft build`` and ``edgepeft update create`` both describe adapters to
devices; keeping the entry here means a device sees the same fields whichever
way an adapter arrived.
"""

from __future__ import annotations

from .adapters_in import AdapterInput


def adapter_entry(a: AdapterInput, *, file: str, fingerprint: str, dtype: str, labels=None) -> dict:
    """The manifest/update entry of adapter ``a`` exported to ``file`` for base ``fingerprint``."""
    entry = {"name": a.name, "version": a.version, "file": file, "method": a.method,
             "base_fingerprint": fingerprint, "task": a.task, "dtype": dtype,
             "target_modules": a.target_modules, "metrics": a.public_metrics}
    if a.method == "lora":
        entry.update(rank=a.rank, alpha=a.alpha)
    elif a.method == "bottleneck":
        entry.update(bottleneck_size=a.bottleneck_size, activation=a.activation)
    else:
        entry["virtual_tokens"] = a.virtual_tokens
    if a.task == "classification":
        entry["labels"] = list(a.labels or labels or [])  # the training record's names win over PEFT's LABEL_n
        entry["review_threshold"] = float(a.record.get("review_threshold", 0.6))
    return entry
