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

step "8. version 2 of the adapter: 10 more steps from version 1, packaged as a signed update"
edgepeft train --data examples/northwind_support/train.jsonl --eval-data examples/northwind_support/eval.jsonl \
  --init-adapter "$NORTHWIND" --out "$OUT/adapters/northwind-v2" --steps 10 --batch-size 2 --lr 1e-3 \
  --max-length 160 --eval-generate 4 --no-progress
edgepeft update create --bundle "$OUT/bundles/pi5" --adapter northwind="$OUT/adapters/northwind-v2" --version 2 \
  --health-check "$OUT/health.jsonl" --expires 30d --key "$OUT/keys/fleet.key" --out "$OUT/updates/northwind-v2.epu"
# the serial gateway's line is slow: the same version as an int8 payload (half the bytes)
edgepeft update create --bundle "$OUT/bundles/pi5" --adapter northwind="$OUT/adapters/northwind-v2" --version 2 \
  --adapter-dtype int8 --health-check "$OUT/health.jsonl" --key "$OUT/keys/fleet.key" \
  --out "$OUT/updates/northwind-v2-int8.epu"
edgepeft update inspect "$OUT/updates/northwind-v2.epu" --trusted-key "$EDGEPEFT_TRUSTED_KEYS"

# three devices, each an agent process on this machine, each started from the .epb it was shipped
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
first_line() {  # FILE PATTERN: wait (up to a minute) for a line matching PATTERN, print it
  for _ in $(seq 1 300); do grep -m1 -E "$2" "$1" 2>/dev/null && return 0; sleep 0.2; done
  echo "timed out waiting for $2 in $1" >&2; return 1
}
start_agent() {  # NAME, extra args...; sets URL
  local name=$1; shift
  mkdir -p "$OUT/devices"
  edgepeft agent "$OUT/bundles/pi5.epb" --state "$OUT/devices/$name" --listen 127.0.0.1:0 \
    --audit "$OUT/devices/$name-audit.jsonl" "$@" >"$OUT/devices/$name.out" 2>"$OUT/devices/$name.log" &
  PIDS+=("$!")
  URL=$(first_line "$OUT/devices/$name.out" '^listening ' | awk '{print $2}')
  echo "device $name: agent on $URL (token in $OUT/devices/$name/token)"
}
ask() {  # URL -> which adapter version answered, and the answer's start
  python - "$1" "$ASK" <<'PY'
import json, sys, urllib.request
body = {"model": "northwind", "max_tokens": 40, "messages": [{"role": "user", "content": sys.argv[2]}]}
req = urllib.request.Request(sys.argv[1] + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
r = json.load(urllib.request.urlopen(req, timeout=300))
print(f"  northwind v{r['adapter_version']} answers: {r['choices'][0]['message']['content'][:90]!r}")
PY
}

step "9. device A: push version 2 over HTTP (it installs, runs the health check, then commits)"
start_agent device-a
ask "$URL"
edgepeft push "$OUT/updates/northwind-v2.epu" --to "$URL" --token-file "$OUT/devices/device-a/token"
ask "$URL"
edgepeft status --device "$URL" --token-file "$OUT/devices/device-a/token"
echo "audit log: $(tail -n 1 "$OUT/devices/device-a-audit.jsonl" | python -c 'import json,sys; e=json.load(sys.stdin); print(e["adapters"])')"
echo "a replayed version 2 and a tampered copy are refused; device A keeps serving version 2:"
edgepeft push "$OUT/updates/northwind-v2-int8.epu" --to "$URL" --token-file "$OUT/devices/device-a/token" || true
python - "$OUT/updates/northwind-v2.epu" "$OUT/updates/tampered.epu" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read()); data[-100] ^= 1; open(sys.argv[2], "wb").write(data)
PY
edgepeft push "$OUT/updates/tampered.epu" --to "$URL" --token-file "$OUT/devices/device-a/token" || true

step "10. device B: the same version over a serial line (a pseudo-terminal null modem at 921600 baud, line rate enforced)"
python -m edgepeft.transport.linesim 921600 >"$OUT/devices/line.out" &
PIDS+=("$!")
read -r HOST_END DEVICE_END < <(first_line "$OUT/devices/line.out" '^/dev/')
start_agent device-b --serial "$DEVICE_END" --baud 921600
SECONDS=0
edgepeft push "$OUT/updates/northwind-v2-int8.epu" --to "serial://$HOST_END?baud=921600"
echo "($(stat -c %s "$OUT/updates/northwind-v2-int8.epu") bytes in ${SECONDS} s over a 92,160 B/s line)"
ask "$URL"

step "11. device C: publish to a TUF repository on static hosting; the device pulls it on its own"
edgepeft publish "$OUT/updates/northwind-v2.epu" --repo "$OUT/repo" --key "$OUT/keys/fleet.key"
python -u -m http.server 0 --bind 127.0.0.1 --directory "$OUT/repo" >"$OUT/devices/web.out" 2>/dev/null &
PIDS+=("$!")
REPO_URL="http://127.0.0.1:$(first_line "$OUT/devices/web.out" ' port [0-9]+' | sed -E 's/.* port ([0-9]+) .*/\1/')"
start_agent device-c --pull "$REPO_URL" --interval 2
for _ in $(seq 1 120); do
  edgepeft status --device "$URL" --token-file "$OUT/devices/device-c/token" --json 2>/dev/null \
    | python -c 'import json,sys; a=[x for x in json.load(sys.stdin)["adapters"] if x["name"]=="northwind"]; sys.exit(0 if a and a[0]["version"]==2 else 1)' \
    && break
  sleep 1
done
ask "$URL"

step "done: bundles and updates are in $OUT, adapters and before/after figures in examples/out"
ls -la "$OUT/bundles" "$OUT/updates"
