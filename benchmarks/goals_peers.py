"""The decode, memory and start-up goals against the peers (issue 24), at 135M and at the 1B shape.

Every row is a ratio of two figures of the *same run*: the 135M rows come from sections 1 (decode) and 6
(memory), the 1B rows from section 12 (scale). A row whose figures were not measured says which is missing
and counts as "not measured", never as met. The goals name the float-base path first, since that is what a
user's own fine-tuned base gets (``build --gguf requantize`` is the same graph as a float base's).
"""

from __future__ import annotations

from dataclasses import dataclass

from .harness import Section
from .sec_scale import EP_AD, EP_BARE, EP_SLOTS, GENAI_1B, GENAI_1B_AD
from .systems import (
    EP_INT4,
    EP_INT4_AD,
    EP_INT4_RQ,
    EP_INT4_RQ_AD,
    EP_INT4_RQ_MERGED,
    GENAI,
    GENAI_AD,
    LLAMA,
)


@dataclass(frozen=True)
class Pair:
    """One goal: ``mine``'s figure over ``ref``'s in group ``gid``, against ``target`` (``at_least``:
    the ratio must reach it; else it must stay at or under it)."""

    name: str
    gid: str
    mine: str
    ref: str
    target: float
    at_least: bool = True


# (model label, goals): the 135M rows, then the 1B shape's (its adapter is rank 16)
PLAN = [
    ("135M", [
        Pair("float-base int4, no adapter >= genai int4", "decode.decode_tok_s", EP_INT4_RQ, GENAI, 1.0),
        Pair("float-base int4 + rank-8 adapter >= 0.9x genai int4 bare", "decode.decode_tok_s", EP_INT4_RQ_AD,
             GENAI, 0.9),
        Pair("float-base int4 + rank-8 adapter >= 1.3x genai int4 + adapter", "decode.decode_tok_s", EP_INT4_RQ_AD,
             GENAI_AD, 1.3),
        Pair("slot graph without adapter within 5 % of the merged graph", "decode.decode_tok_s", EP_INT4_RQ,
             EP_INT4_RQ_MERGED, 0.95),
        Pair("GGUF-exact default, no adapter >= 1.15x llama.cpp", "decode.decode_tok_s", EP_INT4, LLAMA, 1.15),
        Pair("GGUF-exact default + rank-8 adapter >= llama.cpp bare", "decode.decode_tok_s", EP_INT4_AD, LLAMA, 1.0),
        Pair("resident memory, float-base, no adapter <= genai int4", "memory.rss_bytes", f"{EP_INT4_RQ}, 0 adapters",
             "genai int4", 1.0, at_least=False),
        Pair("resident memory, float-base, 1 adapter <= genai int4", "memory.rss_bytes", f"{EP_INT4_RQ}, 1 adapter",
             "genai int4", 1.0, at_least=False),
        Pair("resident memory, GGUF-exact default, no adapter <= genai int4", "memory.rss_bytes",
             f"{EP_INT4}, 0 adapters", "genai int4", 1.0, at_least=False),
        Pair("open to first token, float-base <= 1.2x genai int4", "memory.open_to_first_token_s", EP_INT4_RQ,
             "genai int4", 1.2, at_least=False),
        Pair("open to first token, GGUF-exact default <= 1.2x genai int4", "memory.open_to_first_token_s", EP_INT4,
             "genai int4", 1.2, at_least=False),
        Pair("stretch: float-base + rank-8 adapter >= genai int4 bare", "decode.decode_tok_s", EP_INT4_RQ_AD,
             GENAI, 1.0),
    ]),
    ("1B shape", [
        Pair("float-base int4, no adapter >= genai int4", "scale.decode_tok_s", EP_SLOTS, GENAI_1B, 1.0),
        Pair("float-base int4 + rank-16 adapter >= 0.9x genai int4 bare", "scale.decode_tok_s", EP_AD, GENAI_1B, 0.9),
        Pair("float-base int4 + rank-16 adapter >= 1.3x genai int4 + adapter", "scale.decode_tok_s", EP_AD,
             GENAI_1B_AD, 1.3),
        Pair("slot graph without adapter within 5 % of the merged graph", "scale.decode_tok_s", EP_SLOTS, EP_BARE,
             0.95),
        Pair("resident memory, no adapter <= genai int4", "scale.rss_bytes", EP_SLOTS, GENAI_1B, 1.0,
             at_least=False),
        Pair("resident memory, 1 adapter <= genai int4", "scale.rss_bytes", EP_AD, GENAI_1B, 1.0, at_least=False),
        Pair("open to first token <= 1.2x genai int4", "scale.open_to_first_token_s", EP_SLOTS, GENAI_1B, 1.2,
             at_least=False),
        Pair("stretch: float-base + rank-16 adapter >= genai int4 bare", "scale.decode_tok_s", EP_AD, GENAI_1B, 1.0),
    ]),
]
# Rows that cannot exist at the 1B shape: llama.cpp needs a GGUF, and the 1B base is random float weights.
NO_GGUF_1B = ["GGUF-exact default, no adapter >= 1.15x llama.cpp", "GGUF-exact default + rank-8 adapter >= llama.cpp bare"]


def _fmt(value: float, gid: str) -> str:
    if gid.endswith("tok_s"):
        return f"{value:.1f} tok/s"
    if gid.endswith("bytes"):
        return f"{value / 2 ** 20:.0f} MiB"
    return f"{value * 1e3:.0f} ms"


def goal_row(pair: Pair, model: str, sections: dict[str, Section]) -> dict:
    """One goal row: {"name", "target", "met", "ratio", "measured"}; ``met`` is None when a figure is missing."""
    sid, _, local = pair.gid.partition(".")
    row = {"name": f"{model}: {pair.name}",
           "target": f"ratio {'>=' if pair.at_least else '<='} {pair.target:.2f}"}
    sec = sections.get(sid)
    grp = sec.find(local) if sec is not None else None
    mine, ref = (grp.get(pair.mine), grp.get(pair.ref)) if grp is not None else (None, None)
    if mine is None or ref is None or not ref.median:
        missing = [n for n, f in ((pair.mine, mine), (pair.ref, ref)) if f is None] or [pair.ref]
        return row | {"met": None, "measured": f"not measured in this run ({', '.join(missing)})"}
    ratio = mine.median / ref.median
    met = ratio >= pair.target if pair.at_least else ratio <= pair.target
    return row | {"met": met, "ratio": ratio,
                  "measured": f"{_fmt(mine.median, local)} vs {_fmt(ref.median, local)} ({pair.ref}) = {ratio:.2f}x"}


def goals_peers(sections: list[Section]) -> list[dict]:
    """Issue 24's goal rows for 135M and the 1B shape, from this run's sections (absent ones give
    "not measured" rows, so a partial run still shows every goal)."""
    by_id = {s.id: s for s in sections}
    out = []
    for model, pairs in PLAN:
        out += [goal_row(p, model, by_id) for p in pairs]
    out += [{"name": f"1B shape: {n}", "target": "ratio >= " + ("1.15" if "1.15" in n else "1.00"), "met": None,
             "measured": "no GGUF of the 1B shape (its base is random float weights; llama.cpp reads only GGUF)"}
            for n in NO_GGUF_1B]
    return out
