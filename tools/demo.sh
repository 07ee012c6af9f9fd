#!/usr/bin/env bash
# The main job end to end on the embedded SmolLM2-135M-Instruct and all-MiniLM-L6-v2, offline.
# Run it through `make demo`, which creates the environment first. About 2-3 minutes on 2 idle CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/demo}
rm -rf "$OUT"; mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
step() { printf '\n== %s\n' "$*"; }
ASK="My Wi-Fi keeps dropping every evening. What should I do?"

step "1. device target profiles"
edgepeft targets

step "2. signing key (the .key stays on the server, the .pub goes on devices)"
edgepeft keygen --out "$OUT/keys/fleet"
export EDGEPEFT_TRUSTED_KEYS="$OUT/keys/fleet.pub"

step "3. train a LoRA adapter in the Northwind support voice on SmolLM2-135M-Instruct (before/after on held-out questions)"
# adapters and figures go to examples/out/, where `make bench` picks them up for its task metrics
python examples/train_support_voice.py --quiet
NORTHWIND=examples/out/northwind-voice

step "4. build an int4 bundle for a Raspberry Pi 5: base once, the adapter as a small swappable file, signed"
printf '%s\n' '{"input": "Hello, who are you?", "adapter": "northwind", "expect": {"contains": "Northwind"}, "max_new_tokens": 48}' \
  > "$OUT/health.jsonl"
edgepeft build --adapter northwind="$NORTHWIND" --target raspberry-pi-5 --quant int4 \
  --health-check "$OUT/health.jsonl" --key "$OUT/keys/fleet.key" --out "$OUT/bundles/pi5"

step "5. run on the device side (no torch): the bare base, then the adapter, one loaded model"
edgepeft run "$OUT/bundles/pi5" --prompt "$ASK" --max-new-tokens 60
edgepeft run "$OUT/bundles/pi5" --adapter northwind --prompt "$ASK" --max-new-tokens 60

step "6. train an intent classifier (LoRA on all-MiniLM-L6-v2), build int8 for the x86-64 gateway, classify"
python examples/train_bank_intents.py --quiet
edgepeft build --adapter intents=examples/out/bank-intents --target x86-64-gateway \
  --key "$OUT/keys/fleet.key" --out "$OUT/bundles/gateway"
edgepeft run "$OUT/bundles/gateway" --adapter intents \
  --classify "someone used my card in another country and I did not do it" \
  --classify "how do I change my PIN?" --classify "the app shows my payment twice"

step "7. the local HTTP API an app would call (OpenAI-style, 127.0.0.1 only)"
python - "$OUT/bundles/pi5" "$EDGEPEFT_TRUSTED_KEYS" "$ASK" <<'PY'
import json, sys, threading, urllib.request
from edgepeft.runtime import Engine
from edgepeft.runtime.server import EngineServer
engine = Engine(sys.argv[1], [sys.argv[2]])
server = EngineServer(engine, "127.0.0.1", 0)
threading.Thread(target=server.serve_forever, daemon=True).start()
body = {"model": "northwind", "max_tokens": 40, "messages": [{"role": "user", "content": sys.argv[3]}]}
req = urllib.request.Request(server.url + "/v1/chat/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=120))
print("POST /v1/chat/completions ->", reply["choices"][0]["message"]["content"][:200])
server.shutdown(); server.server_close()
PY

step "done: bundles are in $OUT, adapters and before/after figures in examples/out"
ls -la "$OUT/bundles"
