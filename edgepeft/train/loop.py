"""The training loop: a plain torch loop over an ``accelerate.Accelerator``.

Why not ``transformers.Trainer``: a small loop keeps Ctrl-C handling, exact
resume and the progress bar in one readable place. ``Accelerator`` supplies the
device, mixed precision and multi-GPU (DDP) wrapping, so the same code runs
as ``python``/``edgepeft train`` on one device and under ``accelerate launch``
on several.

Data order is a pure function of (seed, epoch): each epoch is a seeded
permutation, split round-robin over processes. A checkpoint therefore only
needs (epoch, next optimizer step within the epoch) to resume exactly where it
stopped; it also holds the trainable weights, optimizer, scheduler and RNG
states. Ctrl-C sets a flag; the loop finishes the current optimizer step,
writes a checkpoint and raises :class:`TrainingInterrupted`. A second Ctrl-C
aborts at once.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TrainError
from ..fsio import atomic_path
from .encode import collate

CHECKPOINT = "checkpoint.pt"


class TrainingInterrupted(TrainError):
    """Training stopped on request (Ctrl-C) after saving a checkpoint; ``--resume`` continues."""

    exit_code = 130


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    next_group: int = 0  # optimizer step index within the epoch to run next
    losses: list = field(default_factory=list)  # [step, train loss]
    seconds: float = 0.0  # training time before this run (resume)


@dataclass
class Plan:
    total_steps: int
    steps_per_epoch: int
    micro_batches_per_epoch: int


def plan(n_train: int, batch_size: int, grad_accum: int, world: int, epochs: float, max_steps: int | None) -> Plan:
    micro = math.ceil(n_train / (batch_size * world))
    per_epoch = math.ceil(micro / grad_accum)
    total = max_steps if max_steps else max(1, math.ceil(per_epoch * epochs))
    return Plan(total, per_epoch, micro)


def epoch_groups(n_train: int, batch_size: int, grad_accum: int, world: int, rank: int, seed: int, epoch: int):
    """This process's micro-batches of one epoch, grouped per optimizer step (lists of record indices)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n_train, generator=g).tolist()
    per_round = batch_size * world
    rounds = math.ceil(n_train / per_round)
    order += order[: rounds * per_round - n_train]  # wrap so every process gets the same number of batches
    mine = order[rank::world]
    micro = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    return [micro[i:i + grad_accum] for i in range(0, len(micro), grad_accum)]


def lr_lambda(total: int, warmup_frac: float):
    warm = int(total * warmup_frac)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))
    return f


@contextmanager
def ctrl_c_flag():
    """Yield a dict whose "stop" turns True on the first SIGINT; the second one interrupts as usual."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # installed from C: put Python's default back afterwards
        previous = signal.default_int_handler

    def handler(signum, frame):
        if flag["stop"]:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag["stop"] = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def save_checkpoint(path: Path, model, optimizer, scheduler, state: LoopState, meta: dict) -> None:
    """Write everything needed to resume to ``path/checkpoint.pt``, atomically."""
    import random

    import torch

    path.mkdir(parents=True, exist_ok=True)
    blob = {
        "meta": meta,
        "state": state.__dict__,
        "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    with atomic_path(path / CHECKPOINT) as tmp:
        torch.save(blob, tmp)


def read_checkpoint(path: Path) -> dict:
    import torch

    try:
        return torch.load(path / CHECKPOINT, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise TrainError(f"cannot read the checkpoint in {path}: {exc}",
                         hint=f"delete {path} and train again without --resume") from exc


def restore(blob: dict, model, optimizer, scheduler) -> LoopState:
    import random

    import torch

    params = dict(model.named_parameters())
    missing = [n for n in blob["trainable"] if n not in params]
    if missing:
        raise TrainError(f"the checkpoint does not fit this model ({missing[0]} ...)",
                         hint="resume with the same base and LoRA options, or train again without --resume")
    with torch.no_grad():
        for n, t in blob["trainable"].items():
            params[n].copy_(t.to(params[n].device))
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["torch"])
    random.setstate(blob["rng"]["python"])
    if blob["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return LoopState(**blob["state"])


def run(model, items: list[dict], *, opts, accelerator, pad_id: int, checkpoint_dir: Path, meta: dict,
        resume_blob: dict | None = None, on_step=None) -> LoopState:
    """Train ``model`` (already LoRA-wrapped) on encoded ``items``; returns the final loop state.

    Raises :class:`TrainingInterrupted` after saving a checkpoint when Ctrl-C is
    pressed, and :class:`TrainError` when the loss stops being a number.
    """
    import torch
    from tqdm.auto import tqdm

    world, rank = accelerator.num_processes, accelerator.process_index
    p = plan(len(items), opts.batch_size, opts.grad_accum, world, opts.epochs, opts.max_steps)
    trainable = [t for t in model.parameters() if t.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=opts.learning_rate, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(p.total_steps, opts.warmup))
    state = restore(resume_blob, model, optimizer, scheduler) if resume_blob else LoopState()
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    wrapped.train()
    bar = tqdm(total=p.total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (opts.progress and accelerator.is_main_process))
    started = time.monotonic()

    def checkpoint():
        state.seconds += time.monotonic() - started
        if accelerator.is_main_process:
            save_checkpoint(checkpoint_dir, accelerator.unwrap_model(wrapped), optimizer, scheduler, state, meta)
        accelerator.wait_for_everyone()
        state.seconds -= time.monotonic() - started

    with ctrl_c_flag() as flag, bar:
        while state.step < p.total_steps:
            groups = epoch_groups(len(items), opts.batch_size, opts.grad_accum, world, rank, opts.seed, state.epoch)
            for g in range(state.next_group, len(groups)):
                loss_sum = 0.0
                for j, idx in enumerate(groups[g]):
                    batch = {k: v.to(accelerator.device) for k, v in collate([items[i] for i in idx], pad_id).items()}
                    sync = j == len(groups[g]) - 1
                    with (nullcontext() if sync else accelerator.no_sync(wrapped)), accelerator.autocast():
                        loss = wrapped(**batch).loss / len(groups[g])
                        accelerator.backward(loss)
                    loss_sum += float(loss.detach())
                accelerator.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if world > 1:
                    loss_sum = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "mean"))
                if not math.isfinite(loss_sum):
                    raise TrainError(f"the loss became {loss_sum} at step {state.step + 1}",
                                     hint="lower --lr, or check the data for empty answers")
                state.step += 1
                state.next_group = g + 1
                state.losses.append([state.step, round(loss_sum, 6)])
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                bar.update(1)
                if on_step is not None:
                    on_step(state.step, loss_sum)
                stop = flag["stop"]
                if world > 1:
                    stop = bool(accelerator.reduce(torch.tensor(int(stop), device=accelerator.device), "sum"))
                if stop:
                    checkpoint()
                    raise TrainingInterrupted(
                        f"training stopped at step {state.step}/{p.total_steps}; checkpoint saved in {checkpoint_dir}",
                        hint="run the same command with --resume to continue")
                if opts.save_every and state.step % opts.save_every == 0 and state.step < p.total_steps:
                    checkpoint()
                if state.step >= p.total_steps:
                    break
            else:
                state.epoch += 1
                state.next_group = 0
    state.seconds += time.monotonic() - started
    return state
