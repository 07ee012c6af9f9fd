"""Copy a bundle with another MatMulNBits accuracy_level, re-hashed and re-signed (an experiment tool).

    python tools/bundle_accuracy_level.py SRC_BUNDLE DST_BUNDLE SIGNING_KEY LEVEL

accuracy_level 4 (what the exporter writes) lets ONNX Runtime quantize activations to int8 inside
int4/int8 MatMulNBits; 1 keeps them float. docs/aarch64.md compares the two for
cross-architecture reproducibility: run tools/device_probe.py --bundle on the copy natively and in the
emulated device. Server side (needs onnx); the signing key must be one the device trusts.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    import onnx

    from edgepeft.contracts.signing import load_private_key, sign_manifest
    from edgepeft.contracts.verify import sha256_file

    src, dst, key, level = Path(argv[0]), Path(argv[1]), argv[2], int(argv[3])
    if dst.exists():
        print(f"error: {dst} exists", file=sys.stderr)
        return 2
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    changed = 0
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i, changed = level, changed + 1
    onnx.save(model, str(dst / "model.onnx"))
    data = json.loads((dst / "manifest.json").read_text(encoding="utf-8"))
    data.pop("signature", None)
    for entry in data["files"]:
        entry["size"], entry["sha256"] = (dst / entry["path"]).stat().st_size, sha256_file(dst / entry["path"])
    signed = sign_manifest(data, load_private_key(key))
    (dst / "manifest.json").write_text(json.dumps(signed, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"{dst}: {changed} MatMulNBits nodes at accuracy_level {level}, re-signed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
