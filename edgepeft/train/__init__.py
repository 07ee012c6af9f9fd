"""Server-side fine-tuning: LoRA and QLoRA adapters for decoders and classifiers.

Python API (``edgepeft train`` on the command line takes the same options)::

    from edgepeft.train import train
    result = train(data="support.jsonl", out="adapters/support", rank=8, max_steps=200)
    result.out       # a standard PEFT adapter directory (PeftModel.from_pretrained loads it)
    result.metrics   # {"schema": 1, "task", "train": {...}, "eval": {...}, "baseline": {...} | None}
    result.model     # the trained PeftModel, still in memory

Several GPUs
------------
The training loop runs on ``accelerate.Accelerator``, so the same command
scales out with ``accelerate launch`` (data-parallel, one process per GPU)::

    accelerate launch --num_processes 4 "$(which edgepeft)" train --data d.jsonl --out adapter ...
    accelerate launch --num_processes 4 my_script.py     # a script that calls edgepeft.train.train()

``--batch-size`` is per process, so the effective batch is
``batch_size x grad_accum x processes``. Each process reads the whole data
file and takes every n-th example of the same seeded shuffle. Only the main
process evaluates, writes checkpoints and publishes ``--out``. A stop
request (SIGINT) seen by any process stops all of them after the same step
and the main process writes the checkpoint; launchers may also tear processes
down on Ctrl-C, so long multi-GPU runs should add ``--save-every N``. ``--method qlora`` loads the 4-bit base on each
process's own GPU. ``accelerate launch --cpu --num_processes 2`` runs the same
path on CPU processes (gloo); that, and one GPU, were checked by hand (the test
suite covers the single-process path and the per-process data split). Starting
several processes without accelerate (a bare ``torchrun`` on CPU) is refused
with a TrainError rather than having every process write ``--out``.
``--precision auto`` uses bf16 autocast on GPUs that have it, fp32 otherwise,
and defers to ``accelerate launch --mixed_precision`` when that is given.

Importing this package is cheap: torch, transformers and peft load inside
``train()``. See :func:`edgepeft.train.runner.train` for what may be raised.
"""

from .loop import TrainingInterrupted
from .options import DEFAULT_TARGETS, TrainOptions, default_targets
from .runner import TrainResult, train

__all__ = ["train", "TrainOptions", "TrainResult", "TrainingInterrupted", "DEFAULT_TARGETS", "default_targets"]
