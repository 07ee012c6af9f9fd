"""The options of one training run, validated where they enter.

:class:`TrainOptions` is the single place where every training default lives;
the CLI (``edgepeft train``) and the Python API (:func:`edgepeft.train.train`)
both build one. Validation needs no heavy library, so a bad option fails in
milliseconds, before any model is loaded. Torch-free on purpose.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..contracts.fields import check_choice
from ..contracts.manifest import TASKS
from ..contracts.metrics import ANSWER_MAX_NEW_TOKENS, ANSWER_PROMPTS
from ..errors import TrainError, UsageError

METHODS = ("lora", "qlora", "prompt-tuning", "prefix-tuning", "bottleneck")
PROMPT_METHODS = ("prompt-tuning", "prefix-tuning")  # PEFT prompt learning: decoders only (see the runner)
# Peak learning rate when --lr is not given: soft prompts and prefixes need much larger steps than LoRA
# (PEFT's prompt-learning examples use 1e-2..3e-2); bottleneck adapters train from a zero up-projection.
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "prompt-tuning": 3e-2, "prefix-tuning": 1e-2, "bottleneck": 1e-3}
# Small data (the common case here: tens to hundreds of rows) moves only with larger LoRA steps and more passes.
# Measured with tools/small_data_defaults.py on the examples' sizes (docs/training.md): 2e-4 for 4 steps left
# the held-out loss where it was; these rates for >= 40 optimizer steps moved it.
SMALL_DATA_ROWS = 1000  # fewer training rows than this get the small-data defaults below
SMALL_DATA_LR = {("lora", "causal-lm"): 2e-3, ("qlora", "causal-lm"): 2e-3, ("lora", "classification"): 3e-3}
MIN_STEPS = 40  # small data: enough passes for this many optimizer steps ...
MAX_AUTO_EPOCHS = 10  # ... but no more passes than this
SMALL_EVAL = 256  # held-out sets this small are also scored on the bare base (before -> after)
PLACEMENTS = ("houlsby", "pfeiffer")
NON_LINEARITIES = ("relu", "silu", "gelu")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# LoRA targets per architecture (config.model_type). Attention and MLP
# projections: adapting every linear layer is what the QLoRA paper found
# closest to full fine-tuning. Names are matched as module-name suffixes.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}


def default_targets(model_type: str) -> list[str] | str:
    """Target modules for ``model_type``; ``"all-linear"`` (peft's own rule) when unknown."""
    targets = DEFAULT_TARGETS.get(model_type)
    return list(targets) if targets else "all-linear"


@dataclass
class TrainOptions:
    """Everything that decides one training run; JSON-able, recorded with the adapter.

    ``data`` is JSON Lines, CSV, or a saved ``datasets`` directory; ``out`` is
    the adapter directory to create. ``task`` None means "causal-lm" unless the
    data has a ``label`` column. ``method`` picks the family: LoRA / QLoRA
    (``rank``, ``alpha``, ``dropout``, ``target_modules``), prompt or prefix tuning
    (``virtual_tokens``; ``prompt_init`` text for prompt tuning, ``prefix_projection``),
    or a bottleneck adapter (``bottleneck_size``, ``placement``, ``non_linearity``). ``epochs`` counts passes over the training
    split; ``max_steps`` (optimizer steps), when set, wins. ``eval_split`` is
    the held-out fraction (0 disables evaluation) unless ``eval_data`` names a
    separate file. Raises :class:`UsageError` or :class:`TrainError` on values
    that cannot work.
    """

    data: str
    out: str
    base: str | None = None
    task: str | None = None
    method: str = "lora"
    rank: int = 8
    alpha: float | None = None  # None: 2 * rank
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: per-architecture default
    epochs: float | None = None  # None: 1 pass; small data: enough passes for MIN_STEPS steps (resolve_defaults)
    max_steps: int | None = None
    learning_rate: float | None = None  # None: DEFAULT_LR of the method
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    warmup: float = 0.05  # fraction of optimizer steps
    weight_decay: float = 0.0
    eval_split: float = 0.1
    eval_data: str | None = None
    eval_before: bool | None = None  # also evaluate the bare base, as "baseline" (None: when the held-out set is small)
    eval_generate: int = ANSWER_PROMPTS  # decoder answer match: at most this many held-out prompts
    max_new_tokens: int = ANSWER_MAX_NEW_TOKENS
    labels: list[str] | None = None  # classification: label names in id order
    slice_column: str | None = None  # None: "slice" when the data has it
    columns: dict | None = None  # role (prompt, completion, text, label, messages, system) -> the data's column
    seed: int = 42
    precision: str = "auto"
    save_every: int = 0  # optimizer steps between checkpoints (0: only on Ctrl-C)
    init_adapter: str | None = None  # start from this PEFT adapter's weights (its next version)
    virtual_tokens: int = 20  # prompt/prefix tuning: virtual tokens (the prefix's key/value positions)
    prompt_init: str | None = None  # prompt/prefix tuning: start from this text (else sampled vocabulary tokens)
    prefix_projection: bool = False  # prefix tuning: train through PEFT's MLP reparametrisation
    bottleneck_size: int | None = None  # bottleneck: width of the down-projection (None: hidden // 16)
    placement: str = "houlsby"  # bottleneck: houlsby (after attention and MLP) or pfeiffer (after the MLP)
    non_linearity: str = "relu"  # bottleneck: relu, silu or gelu
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form, copied into the record

    def __post_init__(self) -> None:
        if not self.data:
            raise UsageError("no training data given", hint="pass --data FILE (JSON Lines, CSV or a datasets directory)")
        if not self.out:
            raise UsageError("no output directory given", hint="pass --out DIR for the adapter")
        check_choice(self.method, METHODS, "method", hint_flag="--method")
        if self.task is not None:
            check_choice(self.task, TASKS, "task", hint_flag="--task")
        check_choice(self.placement, PLACEMENTS, "placement", hint_flag="--placement")
        check_choice(self.non_linearity, NON_LINEARITIES, "non-linearity", hint_flag="--non-linearity")
        if self.method == "prefix-tuning" and self.gradient_checkpointing:
            raise TrainError("prefix tuning cannot use gradient checkpointing: PEFT puts the prefix in the "
                             "key/value cache, which a checkpointed layer would extend again when it recomputes",
                             hint="drop --gradient-checkpointing and lower --batch-size or --max-length to save "
                                  "memory, or use --method prompt-tuning, which can checkpoint")
        _positive_int("virtual_tokens", self.virtual_tokens, "use --virtual-tokens such as 10 or 20")
        if self.bottleneck_size is not None:
            _positive_int("bottleneck_size", self.bottleneck_size, "use --bottleneck-size such as 32 or 64")
        check_choice(self.precision, PRECISIONS, "precision", hint_flag="--precision")
        _positive_int("rank", self.rank, "a LoRA rank is a positive integer such as 8 or 16")
        _positive_int("batch_size", self.batch_size, "use --batch-size 1 or more")
        _positive_int("grad_accum", self.grad_accum, "use --grad-accum 1 or more")
        _positive_int("max_length", self.max_length, "use --max-length such as 256 or 512")
        _positive_int("max_new_tokens", self.max_new_tokens, "use --max-new-tokens 1 or more")
        if self.max_length < 8:
            raise TrainError(f"max_length {self.max_length} is too short to hold a prompt and an answer",
                             hint="use --max-length 64 or more")
        if self.alpha is None:
            self.alpha = float(2 * self.rank)
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise TrainError(f"LoRA alpha must be positive, got {self.alpha!r}", hint="use --alpha 16 (or leave it out for 2 x rank)")
        if not (0.0 <= self.dropout < 1.0):
            raise TrainError(f"dropout must be in [0, 1), got {self.dropout}", hint="use --dropout 0.05")
        if self.max_steps is not None:
            _positive_int("max_steps", self.max_steps, "use --steps 1 or more, or leave it out to train by --epochs")
        elif self.epochs is not None and not (isinstance(self.epochs, (int, float)) and math.isfinite(self.epochs)
                                              and self.epochs > 0):
            raise TrainError(f"epochs must be positive, got {self.epochs}", hint="use --epochs 1 or more, or --steps N")
        if self.learning_rate is not None and not (isinstance(self.learning_rate, (int, float))
                                                   and math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise TrainError(f"learning rate must be positive, got {self.learning_rate}", hint="use --lr 2e-4")
        if not (0.0 <= self.warmup < 1.0):
            raise TrainError(f"warmup must be a fraction in [0, 1), got {self.warmup}", hint="use --warmup 0.05")
        if not (0.0 <= self.eval_split < 1.0):
            raise UsageError(f"eval split must be a fraction in [0, 1), got {self.eval_split}",
                             hint="use --eval-split 0.1, or 0 to skip evaluation")
        if self.eval_generate < 0 or self.save_every < 0:
            raise UsageError("eval_generate and save_every cannot be negative", hint="use 0 to turn them off")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
            if not self.target_modules:
                raise TrainError("the list of target modules is empty",
                                 hint="name modules such as q_proj,v_proj, or leave --target-modules out for the default")
        if self.labels is not None:
            if isinstance(self.labels, str):
                self.labels = [x.strip() for x in self.labels.split(",") if x.strip()]
            self.labels = [str(x) for x in self.labels]
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise UsageError(f"labels must be two or more distinct names, got {self.labels}",
                                 hint="pass --labels neg,pos (names in id order)")
            if self.task is None:
                self.task = "classification"
        if self.columns:
            from ..contracts.records import parse_columns

            self.columns = parse_columns(self.columns)
        self.data = str(self.data)
        self.out = str(self.out)

    def resolve_defaults(self, task: str, n_train: int, n_eval: int) -> list[str]:
        """Fill the options left to the data (learning rate, passes, the before -> after evaluation) once its
        size is known; returns a line saying what was chosen for small data, if anything was."""
        small = n_train < SMALL_DATA_ROWS
        chosen = []
        if self.learning_rate is None:
            self.learning_rate = SMALL_DATA_LR.get((self.method, task), DEFAULT_LR[self.method]) if small \
                else DEFAULT_LR[self.method]
            chosen.append(f"lr {self.learning_rate:g}")
        if self.epochs is None:
            per_epoch = max(1, math.ceil(n_train / (self.batch_size * self.grad_accum)))
            self.epochs = float(min(MAX_AUTO_EPOCHS, max(1, math.ceil(MIN_STEPS / per_epoch)))) if small else 1.0
            if self.max_steps is None:
                chosen.append(f"{self.epochs:g} epoch(s)")
        if self.eval_before is None:
            self.eval_before = 0 < n_eval <= SMALL_EVAL
        if not small or not chosen:
            return []
        return [f"  defaults for small data ({n_train} rows): {', '.join(chosen)} (set --lr / --epochs or "
                "--steps to choose)"]

    @property
    def out_path(self) -> Path:
        return Path(self.out).expanduser().resolve()

    @property
    def partial_path(self) -> Path:
        """Where checkpoints and the unfinished adapter live: ``<out>.partial`` beside ``out``."""
        p = self.out_path
        return p.with_name(p.name + ".partial")

    def to_dict(self) -> dict:
        return asdict(self)

    def resume_key(self) -> dict:
        """The options that must not change between an interrupted run and its ``--resume``."""
        loose = {"resume", "overwrite", "progress", "save_every", "eval_generate", "eval_before", "extra",
                 "max_new_tokens"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in loose}


def _positive_int(name: str, value, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TrainError(f"{name} must be a positive integer, got {value!r}", hint=hint)
