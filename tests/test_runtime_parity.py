"""A bundle decodes to the same greedy tokens wherever it runs, within stated tolerances.

Two fixtures: the fp32 decoder bundle and what a Raspberry Pi 5 gets (int4 MatMulNBits weights,
accuracy_level 4, fp16 adapters). Each records, on the machine that built it, a plain ONNX Runtime
loop's greedy tokens and per-step logits for each adapter and none. In the default suite that
machine is this one (the record must then be met exactly); under `make test-aarch64` it is the
x86-64 host and these tests run on emulated aarch64 against the host's record.

Why the int4 tolerance is wide: accuracy_level 4 quantizes activations to int8 inside MatMulNBits,
and MLAS does that differently on x86-64 (AVX-512 VNNI) and aarch64 (NEON dot product). Measured on
this random tiny model (flat logits in about +-5): fp32 graphs agree across the two to 1.5e-5, the
int4 graph with accuracy_level 0/1 to 4.4e-6, with accuracy_level 4 only to 0.31. So greedy tokens
may part where two logits are closer than that; the test allows a divergence only at such a near
tie and checks every step before it (benchmarks/results/aarch64_emulated.json has the figures).
"""

from __future__ import annotations

import json
import os
import platform

import numpy as np
import pytest
from test_runtime_support import PREBUILT_ENV, cached_bundle, reference_greedy, require_fixtures

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.runtime import Engine  # noqa: E402

LOGIT_ATOL = {"decoder": 1e-4, "decoder-int4": 0.5}
KINDS = sorted(LOGIT_ATOL)


@pytest.fixture(scope="module", params=KINDS)
def built(request, tmp_path_factory):
    return request.param, cached_bundle(request.param, tmp_path_factory)


def _adapter_file(bundle, manifest, name):
    return None if name is None else bundle / next(a["file"] for a in manifest["adapters"] if a["name"] == name)


def _prompt_ids(bundle, prompt):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(prompt, add_special_tokens=False).ids


def test_int4_bundle_is_the_raspberry_pi_build(tmp_path_factory):
    m = cached_bundle("decoder-int4", tmp_path_factory)["manifest"]
    assert m["quantization"]["weights"] == "int4" and m["target"]["arch"] == "aarch64"
    assert {a["dtype"] for a in m["adapters"]} == {"fp16"}


def test_an_onnxruntime_that_computes_int4_wrongly_is_refused(monkeypatch, tmp_path_factory):
    """onnxruntime 1.26 and older (the newest for Python 3.10 is 1.23.2) give this int4 graph logits up to 8.6
    away from its dequantized PyTorch reference (1.27-1.32 agree); such a runtime is refused, not trusted."""
    import onnxruntime

    from edgepeft.errors import BundleError

    b = cached_bundle("decoder-int4", tmp_path_factory)
    monkeypatch.setattr(onnxruntime, "__version__", "1.23.2")
    with pytest.raises(BundleError, match="computes int4 graphs wrongly") as refused:
        Engine(b["bundle"], [b["public_key"]])
    assert "onnxruntime>=1.27" in refused.value.hint
    monkeypatch.setattr(onnxruntime, "__version__", "1.27.0")
    assert Engine(b["bundle"], [b["public_key"]]).task == "causal-lm"


def test_engine_equals_the_plain_loop_on_this_machine(built):
    kind, b = built
    bundle, manifest, ref = b["bundle"], b["manifest"], b["reference"]
    engine = Engine(bundle, [b["public_key"]])
    answers = set()
    for case in ref["cases"]:
        ids = _prompt_ids(bundle, case["prompt"])
        here = reference_greedy(bundle, manifest, ids, ref["steps"], _adapter_file(bundle, manifest, case["adapter"]))
        res = engine.generate(case["prompt"], adapter=case["adapter"], max_new_tokens=ref["steps"])
        assert res.token_ids == here, (kind, case["prompt"], case["adapter"])
        answers.add(tuple(here))
    assert len(answers) == len(ref["cases"])  # every prompt and adapter really changes the answer


def test_greedy_tokens_and_logits_match_the_record(built):
    kind, b = built
    bundle, manifest, ref = b["bundle"], b["manifest"], b["reference"]
    atol, worst, parted, compared = LOGIT_ATOL[kind], 0.0, [], 0
    for case in ref["cases"]:
        rows: list = []
        ids = _prompt_ids(bundle, case["prompt"])
        tokens = reference_greedy(bundle, manifest, ids, ref["steps"], _adapter_file(bundle, manifest, case["adapter"]),
                                  logits=rows)
        want = case["tokens"]
        split = next((i for i, (x, y) in enumerate(zip(tokens, want)) if x != y), None)
        for step, (got, rec) in enumerate(zip(rows, case["logits"])):
            if split is not None and step > split:
                break  # the inputs differ from here on
            rec = np.asarray(rec, np.float32)
            worst = max(worst, float(np.max(np.abs(np.asarray(got) - rec))))
            compared += 1
        if split is None:
            assert len(tokens) == len(want), (case["prompt"], case["adapter"])
        else:
            top2 = np.sort(np.asarray(case["logits"][split], np.float32))[-2:]
            margin = float(top2[1] - top2[0])
            parted.append({"prompt": case["prompt"], "adapter": case["adapter"], "step": split,
                           "recorded_margin": margin})
            assert margin <= 2 * atol, (f"{kind}: tokens part at step {split} although the record's top two logits "
                                        f"were {margin:.3f} apart", case["prompt"], case["adapter"])
    report = os.environ.get("EDGEPEFT_PARITY_REPORT")
    if report:  # tools/aarch64.sh folds these into its benchmark JSON
        with open(f"{report}.{kind}.json", "w", encoding="utf-8") as fh:
            json.dump({"kind": kind, "recorded_on": ref["machine"], "recorded_onnxruntime": ref["onnxruntime"],
                       "checked_on": platform.machine(), "cases": len(ref["cases"]), "steps": ref["steps"],
                       "steps_compared": compared, "max_abs_logit_diff": worst, "tolerance": atol,
                       "parted_at_near_ties": parted}, fh)
    assert worst <= atol, f"{kind}: logits moved by {worst} between {ref['machine']} and {platform.machine()}"
    if not os.environ.get(PREBUILT_ENV):
        assert not parted and worst == 0.0  # recorded in this session, on this machine: exactly reproduced
    # Near-ties part greedy paths between CPUs (the tiny int4 model has many: 2 of 6 cases parted in one
    # emulated run, 5 of 6 after a re-quantization, each at a recorded margin under 0.09): what must hold is
    # that most of the record is compared at all, so the logit bound above has substance.
    total = len(ref["cases"]) * ref["steps"]
    assert compared >= total // 2, f"{kind}: only {compared} of {total} steps compared before paths parted: {parted}"
