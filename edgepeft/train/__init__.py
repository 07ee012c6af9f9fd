"""Server-side fine-tuning: LoRA, QLoRA, prompt/prefix tuning and bottleneck adapters for decoders and
classifiers. ``train()`` (the same options as ``edgepeft train``) writes a standard PEFT adapter directory
with its training record; docs/training.md covers the API and several GPUs. Importing this package is cheap:
torch, transformers and peft load inside ``train()``; :func:`edgepeft.train.runner.train` says what may be raised.
"""

from .loop import TrainingInterrupted
from .options import DEFAULT_TARGETS, TrainOptions, default_targets
from .runner import TrainResult, train

__all__ = ["train", "TrainOptions", "TrainResult", "TrainingInterrupted", "DEFAULT_TARGETS", "default_targets"]
