"""A base model's weights read one tensor at a time from its safetensors files.

Why: loading a model with transformers materialises every weight in fp32 (and the exporter
used to copy them all into numpy): about 7.4 bytes of memory per parameter, so a 3B base needed
22 GB to build. Read lazily, the exporter holds one weight (in fp32) at a time, quantizes it and
spools the result to disk.

:class:`LazyWeights` is a read-only mapping from Hugging Face weight names to float32 numpy
arrays (or, for the largest, :class:`LazyRows` that widen a chunk of rows at a time), the same values
``load_model(...).state_dict()`` gives (bf16/fp16 widen exactly).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import ModelError

_INDEX = "model.safetensors.index.json"
_LARGE = 1 << 24  # elements: a weight this large comes as :class:`LazyRows` (fp32 a chunk of rows at a time)


class LazyRows:
    """A large 2-D weight kept in its stored dtype (bf16: half of fp32), widened to float32 a chunk of
    rows at a time: ``rows[a:b]`` is a float32 array, ``np.asarray(rows)`` the whole weight.

    Why: a 128k-token embedding is 1-2 GiB in fp32; quantizing it, or hashing it, needs it only a few
    thousand rows at a time.
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, tensor):
        self._t = tensor
        self.shape = tuple(int(d) for d in tensor.shape)

    def __getitem__(self, rows) -> np.ndarray:
        if not isinstance(rows, slice):
            raise TypeError("LazyRows takes a slice of rows")
        return self._t[rows].float().numpy()

    def __array__(self, dtype=None, copy=None):
        out = self._t.float().numpy()
        return out if dtype is None else out.astype(dtype, copy=False)

    def row_chunks(self, rows: int = 8192):
        """float32 arrays of up to ``rows`` rows each, in order."""
        for i in range(0, self.shape[0], rows):
            yield self[i:i + rows]


class LazyWeights(Mapping):
    """HF name -> float32 numpy array, read from ``*.safetensors`` on each access (nothing cached).

    ``aliases`` maps a name to another one it shares storage with (a tied ``lm_head.weight``), so
    iterating gives the names ``model.state_dict()`` has. Raises :class:`ModelError` when a file
    cannot be read.
    """

    def __init__(self, files: dict[str, Path], aliases: dict[str, str] | None = None):
        self._files = dict(files)
        self._aliases = {k: v for k, v in (aliases or {}).items() if k not in self._files and v in self._files}

    def __getitem__(self, name: str) -> np.ndarray:
        real = self._aliases.get(name, name)
        path = self._files.get(real)
        if path is None:
            raise KeyError(name)
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                t = f.get_tensor(real)
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            raise ModelError(f"cannot read weight {real} from {path.name}: {exc}",
                             hint="check the model directory's safetensors files") from exc
        if t.is_floating_point() and t.dim() == 2 and t.numel() >= _LARGE:
            return LazyRows(t)
        out = t.float().numpy() if t.is_floating_point() else t.numpy()
        del t
        return out

    def __iter__(self):
        return iter(list(self._files) + list(self._aliases))

    def __len__(self) -> int:
        return len(self._files) + len(self._aliases)

    def __contains__(self, name) -> bool:
        return name in self._files or name in self._aliases


def lazy_weights(path, config) -> LazyWeights | None:
    """The lazily read weights of the model directory ``path``, or None when it has no safetensors files
    (a ``.bin`` checkpoint, a hub id not downloaded: the caller loads the model as before)."""
    d = Path(path)
    if not d.is_dir():
        return None
    index = d / _INDEX
    files: dict[str, Path] = {}
    try:
        if index.is_file():
            files = {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (d / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(d / "model.safetensors"), framework="pt") as f:
                files = {k: d / "model.safetensors" for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read the safetensors index of {d}: {exc}", hint="re-save the model") from exc
    if not files or any(not p.is_file() for p in set(files.values())):
        return None
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return LazyWeights(files, {"lm_head.weight": "model.embed_tokens.weight"} if tied else None)


__all__ = ["LazyRows", "LazyWeights", "lazy_weights"]
