#!/usr/bin/env bash
# docs/walkthrough.md, command for command, on the embedded SmolLM2-135M-Instruct and all-MiniLM-L6-v2, offline.
# tests/test_readme_demo.py checks that every `edgepeft` and `curl` command on that page runs here verbatim, in
# its order, that every one run here is on the page, and that the README's quickstart is a part of them.
# Run it through `make demo`, which creates the environment first. About 17 CPU-minutes: 9-10 minutes on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${OUT:-out/demo}
rm -rf "$WORK"; mkdir -p "$WORK"
# The walkthrough's paths are relative to a checkout: examples/ is read from here, keys/, adapters/ and bundles/
# are written in $WORK (never into the checkout, where a user's own keys/ may live).
ln -s "$ROOT/examples" "$WORK/examples"
cd "$WORK"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT   # the --serve step's server, if the demo stops early
step() { printf '\n== %s\n' "$*"; }
wait_for() {  # seconds, then a command that must succeed before that
  local n=$1; shift
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  "$@"
}

step "1. device target profiles, and the signing key (the .key stays on the server, the .pub goes on devices)"
edgepeft targets
edgepeft keygen --out keys/fleet

step "2. train a LoRA adapter in the Northwind support voice on SmolLM2-135M-Instruct (before -> after on held-out questions),"
step "   and the same voice by prompt tuning (20 virtual tokens, the model untouched)"
edgepeft train --data examples/northwind_support/train.jsonl --eval-data examples/northwind_support/eval.jsonl \
  --out adapters/northwind --steps 30 --batch-size 2 --lr 2e-3 --max-length 160 --warmup 0.1 \
  --eval-before --eval-generate 8 --max-new-tokens 96
edgepeft train --method prompt-tuning --data examples/northwind_support/train.jsonl \
  --eval-data examples/northwind_support/eval.jsonl --out adapters/northwind-prompt --steps 30 --batch-size 2 \
  --max-length 160 --warmup 0.1 --eval-before --eval-generate 8 --max-new-tokens 96

step "3. build an int4 bundle for a Raspberry Pi 5: base once, both adapters as small swappable files, signed"
edgepeft build --adapter northwind=adapters/northwind --adapter northwind-prompt=adapters/northwind-prompt \
  --target raspberry-pi-5 --health-check examples/northwind_support/health.jsonl --key keys/fleet.key --out bundles/pi5

step "4. run on the device side (no torch): the bare base, then each adapter (LoRA, prompt tuning), one loaded model"
edgepeft run bundles/pi5 --trusted-key keys/fleet.pub --prompt "My Wi-Fi keeps dropping every evening. What should I do?"
edgepeft run bundles/pi5 --trusted-key keys/fleet.pub --adapter northwind --prompt "My Wi-Fi keeps dropping every evening. What should I do?"
edgepeft run bundles/pi5 --trusted-key keys/fleet.pub --adapter northwind-prompt --prompt "My Wi-Fi keeps dropping every evening. What should I do?"

step "5. the local HTTP API an app would call (OpenAI-style, 127.0.0.1 only, with the API token): each adapter is a model id"
edgepeft run bundles/pi5 --trusted-key keys/fleet.pub --serve --port 8080 --token-file api.token &
wait_for 60 test -s api.token
curl -s --retry 60 --retry-connrefused --retry-delay 1 http://127.0.0.1:8080/v1/chat/completions \
  -H "Authorization: Bearer $(cat api.token)" -H 'Content-Type: application/json' \
  -d '{"model": "northwind", "max_tokens": 60, "messages": [{"role": "user", "content": "Hello, who are you?"}]}'
echo
curl -s http://127.0.0.1:8080/v1/chat/completions \
  -H "Authorization: Bearer $(cat api.token)" -H 'Content-Type: application/json' \
  -d '{"model": "northwind-prompt", "max_tokens": 60, "messages": [{"role": "user", "content": "Hello, who are you?"}]}'
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
python examples/train_adapter_families.py --from prompt-tuning=adapters/northwind-prompt
python examples/train_bank_intents.py --from adapters/intents

northwind_v2() {  # URL TOKEN_FILE: does the device serve northwind version 2?
  python - "$1" "$2" <<'PY'
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/v1/device",
                             headers={"Authorization": "Bearer " + open(sys.argv[2]).read().strip()})
adapters = json.load(urllib.request.urlopen(req, timeout=10))["adapters"]
sys.exit(0 if any(a["name"] == "northwind" and a["version"] == 2 for a in adapters) else 1)
PY
}

step "9. version 2 of the adapter, trained on from version 1, as a signed update package"
edgepeft train --data examples/northwind_support/train.jsonl --eval-data examples/northwind_support/eval.jsonl \
  --init-adapter adapters/northwind --out adapters/northwind-v2 --steps 10 --batch-size 2 --lr 1e-3 \
  --max-length 160 --eval-generate 4
edgepeft update create --bundle bundles/pi5 --adapter northwind=adapters/northwind-v2 --version 2 \
  --health-check examples/northwind_support/health.jsonl --key keys/fleet.key --out updates/northwind-v2.epu
edgepeft update inspect updates/northwind-v2.epu --trusted-key keys/fleet.pub

step "10. device A: an agent on 127.0.0.1, a push over HTTP, its status, and who answers (the audit log agrees)"
edgepeft agent bundles/pi5.epb --trusted-key keys/fleet.pub --state devices/a --listen 127.0.0.1:8731 &
edgepeft push updates/northwind-v2.epu --to http://127.0.0.1:8731 --token-file devices/a/token
edgepeft status --device http://127.0.0.1:8731 --token-file devices/a/token
curl -s http://127.0.0.1:8731/v1/chat/completions -H "Authorization: Bearer $(cat devices/a/token)" \
  -H 'Content-Type: application/json' \
  -d '{"model": "northwind", "max_tokens": 40, "messages": [{"role": "user", "content": "Hello, who are you?"}]}'
echo
python -c "d = bytearray(open('updates/northwind-v2.epu', 'rb').read()); d[200] ^= 1; open('updates/tampered.epu', 'wb').write(d)"
edgepeft push updates/tampered.epu --to http://127.0.0.1:8731 --token-file devices/a/token || echo "refused: version 2 keeps serving"

step "11. device B over a serial line (two pseudo-terminals joined at 921600 baud, line rate enforced)"
python -m edgepeft.transport.linesim 921600 > line.txt &
wait_for 30 test -s line.txt
read -r HOST_END DEVICE_END < line.txt
edgepeft update create --bundle bundles/pi5 --adapter northwind=adapters/northwind-v2 --version 2 --adapter-dtype int8 \
  --health-check examples/northwind_support/health.jsonl --key keys/fleet.key --out updates/northwind-v2-int8.epu
edgepeft agent bundles/pi5.epb --trusted-key keys/fleet.pub --state devices/b --listen 127.0.0.1:8732 \
  --serial "$DEVICE_END" --baud 921600 &
SECONDS=0
edgepeft push updates/northwind-v2-int8.epu --to "serial://$HOST_END?baud=921600"
echo "($(stat -c %s updates/northwind-v2-int8.epu) bytes in ${SECONDS} s, agent start-up included, on a 92,160 B/s line)"

step "12. device C pulls from a TUF repository served as static files"
edgepeft publish updates/northwind-v2.epu --repo repo --key keys/fleet.key
python -m http.server 8000 --bind 127.0.0.1 --directory repo >/dev/null 2>&1 &
edgepeft agent bundles/pi5.epb --trusted-key keys/fleet.pub --state devices/c --listen 127.0.0.1:8733 \
  --pull http://127.0.0.1:8000 --interval 2 &
wait_for 120 northwind_v2 http://127.0.0.1:8733 devices/c/token
edgepeft status --device http://127.0.0.1:8733 --token-file devices/c/token

step "13. a fleet: a local MQTT broker, device D behind it, device E with its own check that version 3 fails"
printf 'listener 18830 127.0.0.1\nallow_anonymous true\nlog_type error\n' > mosquitto.conf
"$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c mosquitto.conf &
edgepeft agent bundles/pi5.epb --trusted-key keys/fleet.pub --state devices/d --listen 127.0.0.1:8734 \
  --mqtt mqtt://127.0.0.1:18830 --device-id d &
echo '{"input": "Hello, who are you?", "adapter": "northwind", "expect": {"contains": "Contoso"}}' > strict.jsonl
edgepeft agent bundles/pi5.epb --trusted-key keys/fleet.pub --state devices/e --listen 127.0.0.1:8735 \
  --health-check strict.jsonl &

step "14. version 3 (version 2's weights under a new number), published for device D"
edgepeft update create --bundle bundles/pi5 --adapter northwind=adapters/northwind-v2 --version 3 \
  --health-check examples/northwind_support/health.jsonl --key keys/fleet.key --out updates/northwind-v3.epu
edgepeft publish updates/northwind-v3.epu --repo repo --key keys/fleet.key

step "15. the inventory, the plan, the rollout (canary, waves, abort threshold), each device's outcome"
wait_for 60 test -s devices/d/identity.pub   # device D's own key, created on its first start: enrolled below
cat > fleet.toml <<END
[mqtt]
url = "mqtt://127.0.0.1:18830"
[repository]
url = "http://127.0.0.1:8000"
[[device]]
id = "a"
address = "http://127.0.0.1:8731"
token_file = "devices/a/token"
[[device]]
id = "b"
address = "serial://$HOST_END?baud=921600"
[[device]]
id = "c"
address = "http://127.0.0.1:8733"
token_file = "devices/c/token"
[[device]]
id = "d"
address = "mqtt"
public_key = "devices/d/identity.pub"
[[device]]
id = "e"
address = "http://127.0.0.1:8735"
token_file = "devices/e/token"
END
cat > plan.toml <<END
name = "northwind-v3"
inventory = "fleet.toml"
packages = ["updates/northwind-v3.epu"]
key = "keys/fleet.key"
[rollout]
canary = 1
max_concurrency = 2
[rollout.exponential_rate]
base_rate_per_minute = 60
increment_factor = 2
[rollout.exponential_rate.rate_increase_criteria]
number_of_succeeded_things = 2
[timeouts]
in_progress_timeout_minutes = 5
[[abort.criteria]]
failure_type = "ALL"
threshold_percentage = 50
min_number_of_executed_things = 4
[abort]
rollback = true
END
wait_for 60 test -s devices/e/token
edgepeft rollout start plan.toml --db rollouts.sqlite || echo "device E refused version 3, as planned"
edgepeft rollout status --db rollouts.sqlite

step "done: keys, adapters, bundles and updates are in $WORK, before/after figures in examples/out"
ls -la bundles updates

step "16. the web: the Pi bundle in a browser page, and the dashboard of this rollout (start them, then open the URLs)"
(umask 077 && python -c 'import secrets; print(secrets.token_urlsafe(32))' > dashboard.token)
# The page's own folder holds the bundle, the public key and examples/, nothing else: this folder also holds the
# fleet's private key, device tokens and this token, which a static server of it would hand to any local program.
mkdir -p web/bundles web/keys
ln -sfn "$PWD/bundles/pi5" web/bundles/pi5
ln -sfn "$PWD/keys/fleet.pub" web/keys/fleet.pub
ln -sfn "$ROOT/examples" web/examples
{
  printf 'demo page (onnxruntime-web in the browser; needs `npm ci` in examples/js once):\n'
  printf '  %s\n' "(cd $ROOT/examples/js && npm ci) && python -m http.server 8000 --bind 127.0.0.1 --directory $PWD/web"
  printf '  open http://127.0.0.1:8000/examples/web/?bundle=/bundles/pi5/&key=/keys/fleet.pub\n'
  printf 'rollout dashboard (read-only):\n'
  printf '  %s\n' "cd $PWD && edgepeft rollout serve --db rollouts.sqlite --listen 127.0.0.1:8790 --token-file dashboard.token"
  printf '  open http://127.0.0.1:8790/#token=%s\n' "$(cat dashboard.token)"
} | tee web-urls.txt   # make demo prints it again at its very end
