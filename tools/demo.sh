#!/usr/bin/env bash
# The README's quickstart and classifier paths, command for command, on the embedded SmolLM2-135M-Instruct and
# all-MiniLM-L6-v2, offline. tests/test_readme_demo.py checks that every `edgepeft` and `curl` command in those
# README sections runs here verbatim, and that every one run here is in the README.
# Run it through `make demo`, which creates the environment first. About 13 CPU-minutes: 7-8 minutes on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${OUT:-out/demo}
rm -rf "$WORK"; mkdir -p "$WORK"
# The README's paths are relative to a checkout: examples/ is read from here, keys/, adapters/ and bundles/
# are written in $WORK (never into the checkout, where a user's own keys/ may live).
ln -s "$ROOT/examples" "$WORK/examples"
cd "$WORK"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT   # the --serve step's server, if the demo stops early
step() { printf '\n== %s\n' "$*"; }

step "1. device target profiles, and the signing key (the .key stays on the server, the .pub goes on devices)"
edgepeft targets
edgepeft keygen --out keys/fleet

step "2. train a LoRA adapter in the Northwind support voice on SmolLM2-135M-Instruct (before -> after on held-out questions)"
edgepeft train --data examples/northwind_support/train.jsonl --eval-data examples/northwind_support/eval.jsonl \
  --out adapters/northwind --steps 30 --batch-size 2 --lr 2e-3 --max-length 160 --warmup 0.1 \
  --eval-before --eval-generate 8 --max-new-tokens 96

step "3. build an int4 bundle for a Raspberry Pi 5: base once, the adapter as a small swappable file, signed"
edgepeft build --adapter northwind=adapters/northwind --target raspberry-pi-5 \
  --health-check examples/northwind_support/health.jsonl --key keys/fleet.key --out bundles/pi5

step "4. run on the device side (no torch): the bare base, then the adapter, one loaded model"
edgepeft run bundles/pi5 --trusted-key keys/fleet.pub --prompt "My Wi-Fi keeps dropping every evening. What should I do?"
edgepeft run bundles/pi5 --trusted-key keys/fleet.pub --adapter northwind --prompt "My Wi-Fi keeps dropping every evening. What should I do?"

step "5. the local HTTP API an app would call (OpenAI-style, 127.0.0.1 only)"
edgepeft run bundles/pi5 --trusted-key keys/fleet.pub --serve --port 8080 &
curl -s --retry 60 --retry-connrefused --retry-delay 1 http://127.0.0.1:8080/v1/chat/completions \
  -H 'Content-Type: application/json' \
  -d '{"model": "northwind", "max_tokens": 60, "messages": [{"role": "user", "content": "Hello, who are you?"}]}'
kill $!

step "6. train an intent classifier (LoRA on all-MiniLM-L6-v2), build int8 for the x86-64 gateway, classify"
edgepeft train --data examples/bank_intents/train.jsonl --eval-data examples/bank_intents/eval.jsonl \
  --out adapters/intents --steps 40 --batch-size 8 --lr 3e-3 --max-length 64 --warmup 0.1 --eval-before
edgepeft build --adapter intents=adapters/intents --target x86-64-gateway --key keys/fleet.key --out bundles/gateway
edgepeft run bundles/gateway --trusted-key keys/fleet.pub --adapter intents \
  --classify "someone took money from my card" --classify "how do I change my PIN?" \
  --classify "the app shows my payment twice"

step "7. what the bundle holds, and the adapter's held-out figures on the device runtime beside training's"
edgepeft inspect bundles/gateway.epb --trusted-key keys/fleet.pub
edgepeft eval bundles/gateway --trusted-key keys/fleet.pub --data examples/bank_intents/eval.jsonl

step "8. before/after tables from the training records; the adapters go to examples/out, where make bench reads them"
python examples/train_support_voice.py --from adapters/northwind
python examples/train_bank_intents.py --from adapters/intents

step "done: keys, adapters and bundles are in $WORK, before/after figures in examples/out"
ls -la bundles
