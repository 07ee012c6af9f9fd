"""Fold one `make test-aarch64` run into benchmarks/results/aarch64_emulated.json.

    python tools/aarch64_report.py RUN_DIR OUT.json

RUN_DIR is what tools/aarch64.sh leaves: junit-{device,host}.xml and wall-{device,host}.txt (the same
device-side selection, emulated and native), probe-{device,host}.json (tools/device_probe.py),
parity.json.<kind>.json (tests/test_runtime_parity.py), env.json (emulator, CPU model, versions) and,
when step 7 ran, real-{device,host}.json (greedy answers of a real int4 bundle on both).
Emulated figures are only meaningful as ratios: emulated/native per figure, int4/fp32 per machine.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _suite(run: Path, side: str) -> dict:
    root = ET.parse(run / f"junit-{side}.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    slowest = sorted(((float(c.get("time", 0)), f"{c.get('classname')}::{c.get('name')}")
                      for c in suite.iter("testcase")), reverse=True)[:5]
    return counts | {"wall_s": float((run / f"wall-{side}.txt").read_text().strip()),
                     "slowest": [{"test": name, "s": round(t, 2)} for t, name in slowest]}


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def build(run: Path) -> dict:
    env = json.loads((run / "env.json").read_text())
    suites = {side: _suite(run, side) for side in ("device", "host")}
    probes = {side: json.loads((run / f"probe-{side}.json").read_text()) for side in ("device", "host")}
    slowdown, within = {}, {}
    for name, figs in probes["device"]["figures"].items():
        host = probes["host"]["figures"].get(name, {})
        slowdown[name] = {k: (_ratio(v["median"], host[k]["median"]) if k != "decode_tok_s"
                              else _ratio(host[k]["median"], v["median"])) for k, v in figs.items() if k in host}
    for side, probe in probes.items():
        f = probe["figures"]
        within[side] = {"int4_vs_fp32_decode_tok_s": _ratio(f["int4"]["decode_tok_s"]["median"],
                                                            f["fp32"]["decode_tok_s"]["median"]),
                        "adapter_vs_bare_int4_decode_tok_s": _ratio(f["int4 + adapter"]["decode_tok_s"]["median"],
                                                                    f["int4"]["decode_tok_s"]["median"])}
    parity = [json.loads(p.read_text()) for p in sorted(run.glob("parity.json.*.json"))]
    result = {
        "schema": "edgepeft-aarch64/1",
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "note": "aarch64 is emulated (qemu-user): absolute times say nothing about a real device; only the "
                "ratios do. The host ran the same selection natively in the same run.",
        "environment": env,
        "suite": suites | {"slowdown_emulated_vs_native": _ratio(suites["device"]["wall_s"], suites["host"]["wall_s"])},
        "parity": parity,
        "probe": {"device": probes["device"], "host": probes["host"],
                  "slowdown_emulated_vs_native": slowdown, "ratios_within_machine": within},
    }
    if (run / "real-device.json").is_file():
        result["real_model"] = _real(run)
    return result


def _real(run: Path) -> dict:
    """The real bundle's greedy answers on both machines, compared token for token."""
    dev, host = (json.loads((run / f"real-{side}.json").read_text()) for side in ("device", "host"))
    prompts = []
    for d, h in zip(dev["answers"], host["answers"]):
        part = next((i for i, (x, y) in enumerate(zip(d["token_ids"], h["token_ids"])) if x != y), None)
        prompts.append({"chat": d["chat"], "tokens": len(h["token_ids"]),
                        "identical": d["token_ids"] == h["token_ids"], "first_difference_at": part,
                        "text": h["text"], "decode_tok_s": {"device": d["decode_tok_s"], "host": h["decode_tok_s"]},
                        "slowdown_decode": _ratio(h["decode_tok_s"], d["decode_tok_s"])})
    return {"bundle": host["bundle"], "quantization": host["quantization"], "threads": host["threads"],
            "open_s": {"device": dev["open_s"], "host": host["open_s"]},
            "slowdown_open": _ratio(dev["open_s"], host["open_s"]), "prompts": prompts}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python tools/aarch64_report.py RUN_DIR OUT.json", file=sys.stderr)
        return 2
    result = build(Path(argv[0]))
    Path(argv[1]).parent.mkdir(parents=True, exist_ok=True)
    Path(argv[1]).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    s = result["suite"]
    print(f"device suite: {s['device']['tests']} tests, {s['device']['wall_s']:.0f} s emulated vs "
          f"{s['host']['wall_s']:.0f} s native ({s['slowdown_emulated_vs_native']}x)")
    for p in result["parity"]:
        print(f"parity {p['kind']}: max |logit diff| {p['max_abs_logit_diff']:.2g} (tolerance {p['tolerance']}), "
              f"{len(p['parted_at_near_ties'])} of {p['cases']} cases parted at a near tie")
    for p in result.get("real_model", {}).get("prompts", []):
        print(f"{result['real_model']['bundle']} int4: {p['tokens']} greedy tokens "
              f"{'identical' if p['identical'] else 'differ from ' + str(p['first_difference_at'])} "
              f"on emulated aarch64 ({p['chat'][:40]!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
