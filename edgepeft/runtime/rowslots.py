"""Per-row adapter tensors: one run, a different adapter on every row.

A graph whose metadata holds ``edgepeft.row_slots`` = "1" (:mod:`edgepeft.export.slots`) declares its
adapter slots without a shape, so besides an adapter's own tensors a run may bind, per slot group, one
stacked tensor [rows, ...] whose row i holds row i's adapter: each adapter padded with zeros to the
group's widest rank (or bottleneck size, or number of labels), and zeros for a row without one. The
graph's MatMuls and Adds broadcast over the batch, so row i computes with its own adapter.

Both users build these tensors here, so the padding is written once: the decoder's continuous batching
(:mod:`.batching`, tensors kept between steps and rewritten where a row's adapter changed) and the
encoder's mixed batches (:mod:`.classify`, one run per request).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .registry import slot_group

ROW_SLOTS_META = "edgepeft.row_slots"  # graph metadata written by edgepeft.export (its slots take per-row tensors)
DTYPES = {"tensor(float)": np.float32, "tensor(int8)": np.int8}


def takes_row_slots(session) -> bool:
    """Whether the graph's adapter slots take one tensor per row (its ``edgepeft.row_slots`` metadata)."""
    return session.get_modelmeta().custom_metadata_map.get(ROW_SLOTS_META) == "1"


class RowSlot:
    """How one adapter tensor sits in a per-row tensor: the manifest's dims (one may be symbolic, ``"3*rank"``,
    ``"bottleneck"``, ``"num_labels"``: per module, ``m`` blocks of the adapter's width) padded to a common
    width W."""

    def __init__(self, name: str, dims, dtype):
        self.name, self.dtype = name, dtype
        self.axis, self.m = None, 1
        for i, d in enumerate(dims):
            if isinstance(d, str):
                self.axis = i
                head = d.split("*")[0].strip()
                self.m = int(head) if head.isdigit() else 1
        self.dims = list(dims)

    def width(self, arr: np.ndarray) -> int:
        """The adapter's rank (or bottleneck size, or labels) this tensor implies; 0 for a tensor without one."""
        return 0 if self.axis is None else int(arr.shape[self.axis]) // self.m

    def shape(self, w: int) -> tuple:
        """One row's shape at width ``w``; a vector gets a leading 1 (it then adds to [batch, 1, x])."""
        out = [self.m * w if i == self.axis else int(d) for i, d in enumerate(self.dims)]
        return tuple([1] + out if len(out) == 1 else out)

    def place(self, row: np.ndarray, arr: np.ndarray, w: int) -> None:
        """Write ``arr`` into ``row`` (zeros), module block j at [j*w, j*w + r) of the symbolic axis."""
        if self.axis is None:
            row[...] = arr.reshape(row.shape)
            return
        dst = row.reshape(self.shape(w)[-len(self.dims):])
        r = self.width(arr)
        for j in range(self.m):
            into = [slice(None)] * len(self.dims)
            into[self.axis] = slice(j * w, j * w + r)
            take = [slice(None)] * len(self.dims)
            take[self.axis] = slice(j * r, (j + 1) * r)
            dst[tuple(into)] = arr[tuple(take)]


class RowGroup:
    """The per-row tensors of one slot group (a LoRA A with its B slots, a bottleneck point's four parts, a
    head stage's weight and bias): [rows, ...] each, row i holding the adapter given for row i (zeros for
    none), kept between calls of :meth:`fit` and rewritten only where a row's adapter changed."""

    def __init__(self, slots: list[RowSlot], rows: int):
        self.slots, self.rows = slots, rows
        self.w = -1
        self.arrays: list[np.ndarray] = []
        self.holds: list = [None] * rows  # the adapter key each row holds (None: zeros)

    def fit(self, users: Sequence) -> None:
        """Make rows [0, len(users)) hold ``users`` (a loaded adapter, with its ``key`` and ``arrays``, or None
        per row), wider if one needs it."""
        need = max((s.width(u.arrays[s.name]) for u in users if u is not None for s in self.slots), default=0)
        if need > self.w:  # pages of np.zeros are touched only where rows are written
            self.w = max(need, self.w)
            self.arrays = [np.zeros((self.rows, *s.shape(self.w)), s.dtype) for s in self.slots]
            self.holds = ["stale"] * self.rows
        first: dict = {}  # adapter key -> a row that holds it now: later rows of that adapter copy it whole
        for i, u in enumerate(users):
            key = None if u is None else u.key
            j = first.setdefault(key, i)
            if self.holds[i] == key:
                continue
            for s, arr in zip(self.slots, self.arrays):
                if j != i:
                    arr[i] = arr[j]
                    continue
                arr[i] = 0
                if u is not None:
                    s.place(arr[i], u.arrays[s.name], self.w)
            self.holds[i] = key

    def forget(self, key_part) -> None:
        self.holds = ["stale" if h == key_part else h for h in self.holds]


def row_groups(session, model_info: dict, rows: int) -> dict[str, RowGroup]:
    """A :class:`RowGroup` of ``rows`` rows for every slot group of the graph (manifest ``model.slots``, with
    the dtypes the session declares), by group name (:func:`.registry.slot_group`)."""
    types = {i.name: i.type for i in session.get_overridable_initializers()}
    by_group: dict[str, list] = {}
    for name, dims in (model_info.get("slots") or {}).items():
        by_group.setdefault(slot_group(name), []).append(RowSlot(name, dims, DTYPES.get(types.get(name), np.float32)))
    return {g: RowGroup(slots, rows) for g, slots in by_group.items()}


def bind_rows(groups: dict[str, RowGroup], users_by_group: dict[str, Sequence]) -> dict:
    """``{slot name: [n, ...] array}`` for the groups some row uses: ``users_by_group`` maps a group to the
    adapter (or None) of each of the n rows. Groups no row uses are left out (their defaults serve)."""
    feeds = {}
    for g, users in users_by_group.items():
        if not any(u is not None for u in users):
            continue
        group = groups[g]
        group.fit(users)
        for slot, arr in zip(group.slots, group.arrays):
            feeds[slot.name] = arr[:len(users)]
    return feeds


__all__ = ["ROW_SLOTS_META", "RowGroup", "RowSlot", "bind_rows", "row_groups", "takes_row_slots"]
