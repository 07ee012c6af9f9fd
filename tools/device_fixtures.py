"""Build the runtime test fixtures on the host, for a device that cannot build them (no torch there).

    python tools/device_fixtures.py OUT_DIR

Writes ``OUT_DIR/<kind>/`` (a signed tiny bundle, its keys, updates and ``fixture.json``) for every kind
in ``tests/test_runtime_support.KINDS``; the device-side tests read them through
``EDGEPEFT_PREBUILT_FIXTURES=OUT_DIR``. Needs the server side (torch, transformers, peft).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/device_fixtures.py OUT_DIR", file=sys.stderr)
        return 2
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's edgepeft; the builders live with the tests
    from test_runtime_support import KINDS, prebuild

    prebuild(Path(argv[0]))
    print(f"fixtures {', '.join(KINDS)} written to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
