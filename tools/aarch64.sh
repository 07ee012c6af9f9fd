#!/usr/bin/env bash
# make test-aarch64: the device-side test suite on an emulated aarch64 Debian, base install only (no torch).
#
#   1. host tools: qemu-user-static, binfmt-support, debootstrap (apt-get), qemu-aarch64 registered in binfmt_misc
#   2. an arm64 Debian root filesystem with Python 3.11 (debootstrap, cached)
#   3. aarch64 wheels from PyPI (pip download --platform manylinux_2_28_aarch64 --only-binary=:all:, cached)
#      and an edgepeft wheel; the device venv installs `edgepeft` (its base dependencies only) + pytest
#   4. fixtures that need torch are built on this host (tools/device_fixtures.py)
#   5. the device-side tests (tests/conftest.py DEVICE_TESTS) run inside the emulated device; any skip fails
#   6. the same selection runs natively on the host, both run tools/device_probe.py
#   7. a real int4 bundle (the embedded SmolLM2-135M-Instruct, Raspberry Pi 5 target) is built on the host and
#      answers the same chat prompts greedily on both; tools/aarch64_report.py writes
#      benchmarks/results/aarch64_emulated.json (AARCH64_REAL=0 skips step 7)
#
# Needs root (apt-get, binfmt_misc, chroot, mount namespaces) and the Debian mirror and PyPI. First run about
# 10 minutes on 2 cores (debootstrap runs dpkg under emulation), later runs about 5. Settings (environment):
#   HOST_PYTHON   python with edgepeft's server side (default .venv/bin/python)
#   AARCH64_CACHE where the root filesystem and wheels are kept (default ~/.cache/edgepeft-aarch64)
#   QEMU_CPU      emulated core (default cortex-a76, a Raspberry Pi 5's; "max" adds SVE, i8mm, ...)
#   AARCH64_OUT   the JSON written at the end (default benchmarks/results/aarch64_emulated.json)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOST_PY=${HOST_PYTHON:-$ROOT/.venv/bin/python}
CACHE=${AARCH64_CACHE:-$HOME/.cache/edgepeft-aarch64}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export QEMU_CPU=${QEMU_CPU:-cortex-a76}
OUT=${AARCH64_OUT:-$ROOT/benchmarks/results/aarch64_emulated.json}
ROOTFS=$CACHE/rootfs-$SUITE
WHEELS=$CACHE/wheels
RUN=$CACHE/run
SELECT="device and not host_only and not slow"
DEVICE_PACKAGES="onnxruntime numpy tokenizers cryptography click jinja2 pyserial tuf paho-mqtt pytest hypothesis"
SERVER_ONLY="torch transformers peft bitsandbytes onnx accelerate datasets safetensors"

step() { printf '\n== %s\n' "$*"; }
die() { printf 'error: %s\nhint: %s\n' "$1" "$2" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f\n", b - a }'; }

[ "$(id -u)" = 0 ] || die "this needs root (apt-get, binfmt_misc, chroot, mount)" "run: sudo make test-aarch64"
[ -x "$HOST_PY" ] || die "no host python at $HOST_PY" "run make env first, or set HOST_PYTHON"

step "1. host tools: qemu-user-static, binfmt-support, debootstrap"
missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
if [ "$(uname -m)" != aarch64 ]; then
  [ -e /proc/sys/fs/binfmt_misc/status ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
    || die "cannot mount binfmt_misc" "this sandbox does not allow foreign binaries; run on a VM or CI runner"
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
  grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
    || die "qemu-aarch64 is registered without the F flag, so it cannot run inside a chroot" \
           "re-register it from qemu-user-static: update-binfmts --disable qemu-aarch64; update-binfmts --enable qemu-aarch64"
fi
qemu-aarch64-static --version | head -1

step "2. arm64 Debian $SUITE with Python 3.11 ($ROOTFS)"
if [ ! -e "$ROOTFS/.edgepeft-ready" ]; then
  rm -rf --one-file-system "$ROOTFS.tmp"  # never into a mount an interrupted debootstrap left behind
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-distutils \
    "$SUITE" "$ROOTFS.tmp" "$MIRROR"
  touch "$ROOTFS.tmp/.edgepeft-ready"
  rm -rf --one-file-system "$ROOTFS"; mv "$ROOTFS.tmp" "$ROOTFS"
fi
mkdir -p "$ROOTFS/mnt/edgepeft"
# device CMD...: run CMD in the emulated device, cwd /mnt/edgepeft/src; mounts live in a private namespace.
# /sys stays unmounted: the host's x86 CPU topology there crashes onnxruntime's cpuinfo under emulation
# (without it onnxruntime reads the CPU features from the auxiliary vector, as it warns).
device() {
  unshare --mount --propagation private -- /bin/bash -ec '
    rootfs=$1; run=$2; shift 2
    mount --bind "$run" "$rootfs/mnt/edgepeft"
    mount -t proc proc "$rootfs/proc"
    mount --rbind /dev "$rootfs/dev"
    exec chroot "$rootfs" /usr/bin/env -i PATH=/opt/edgepeft/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
      QEMU_CPU="$QEMU_CPU" PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false "$@"' \
    device "$ROOTFS" "$RUN" /bin/sh -c 'cd /mnt/edgepeft/src && exec "$@"' sh "$@"
}

step "3. aarch64 wheels from PyPI, an edgepeft wheel, the device venv (base install: no torch)"
rm -rf --one-file-system "$RUN"; mkdir -p "$RUN/src" "$RUN/wheels" "$WHEELS"
# the source as git sees it (tracked and untracked, not ignored), without the host's build outputs
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 -I{} sh -c '[ -e "{}" ] && printf "%s\0" "{}"' \
  | tar --null -T - -cf -) | tar -xf - -C "$RUN/src"
# shellcheck disable=SC2086
"$HOST_PY" -m pip download -q -d "$WHEELS" -c "$ROOT/constraints.txt" --only-binary=:all: \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
  --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none $DEVICE_PACKAGES
"$HOST_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$RUN/wheels" "$RUN/src"
cp "$WHEELS"/*.whl "$RUN/wheels/"
rm -rf "$RUN/src/build" "$RUN/src"/*.egg-info
stamp=$( (cat "$ROOT/constraints.txt"; ls "$WHEELS") | sha256sum | cut -c1-16)
if [ "$(cat "$ROOTFS/opt/edgepeft/.stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$ROOTFS/opt/edgepeft"
  device python3 -m venv /opt/edgepeft
fi
device python -m pip install -q --disable-pip-version-check --no-index --find-links /mnt/edgepeft/wheels \
  -c constraints.txt edgepeft pytest hypothesis
device python -m pip install -q --disable-pip-version-check --no-index --find-links /mnt/edgepeft/wheels \
  --no-deps --force-reinstall edgepeft
echo "$stamp" > "$ROOTFS/opt/edgepeft/.stamp"
# shellcheck disable=SC2016
device python -c '
import importlib.util, json, platform, sys
from importlib import metadata
server = sys.argv[1].split()
present = [m for m in server if importlib.util.find_spec(m) is not None]
if present:
    sys.exit(f"the device install holds server-side packages: {present}")
print(f"{platform.machine()}: Python {platform.python_version()}, none of {server} installed")
json.dump({"machine": platform.machine(), "python": platform.python_version(),
           "packages": sorted(f"{d.name}=={d.version}" for d in metadata.distributions()),
           "server_side_absent": server}, open("/mnt/edgepeft/device-env.json", "w"))
' "$SERVER_ONLY"

step "4. fixtures that need torch, built on this host"
"$HOST_PY" "$RUN/src/tools/device_fixtures.py" "$RUN/fixtures"

step "5. the device-side tests on emulated aarch64 ($QEMU_CPU)"
t0=$(now)
device env EDGEPEFT_DEVICE_RUN=1 EDGEPEFT_PREBUILT_FIXTURES=/mnt/edgepeft/fixtures \
  EDGEPEFT_PARITY_REPORT=/mnt/edgepeft/parity.json \
  python -m pytest -q -m "$SELECT" --junitxml /mnt/edgepeft/junit-device.xml -o junit_family=xunit1 \
  2> >(grep -v -e 'cpuinfo' -e 'cpuid_info' >&2)
elapsed "$t0" > "$RUN/wall-device.txt"

step "6. the same selection natively, the probes, the report"
t0=$(now)
(cd "$RUN/src" && EDGEPEFT_DEVICE_RUN=1 EDGEPEFT_PREBUILT_FIXTURES="$RUN/fixtures" \
  "$HOST_PY" -m pytest -q -m "$SELECT" --junitxml "$RUN/junit-host.xml" -o junit_family=xunit1)
elapsed "$t0" > "$RUN/wall-host.txt"
device python tools/device_probe.py /mnt/edgepeft/fixtures /mnt/edgepeft/probe-device.json \
  2> >(grep -v -e 'cpuinfo' -e 'cpuid_info' >&2)
(cd "$RUN/src" && "$HOST_PY" tools/device_probe.py "$RUN/fixtures" "$RUN/probe-host.json")
if [ "${AARCH64_REAL:-1}" = 1 ]; then
  step "7. SmolLM2-135M-Instruct int4 for a Raspberry Pi 5, built here: greedy answers natively and emulated"
  mkdir -p "$RUN/real/keys"
  (cd "$RUN/src" && "$HOST_PY" -m edgepeft keygen --out "$RUN/real/keys/fleet" >/dev/null \
    && "$HOST_PY" -m edgepeft build --target raspberry-pi-5 --quant int4 --key "$RUN/real/keys/fleet.key" \
         --out "$RUN/real/bundle" \
    && "$HOST_PY" tools/device_probe.py --bundle "$RUN/real/bundle" --key "$RUN/real/keys/fleet.pub" "$RUN/real-host.json")
  device python tools/device_probe.py --bundle /mnt/edgepeft/real/bundle --key /mnt/edgepeft/real/keys/fleet.pub \
    /mnt/edgepeft/real-device.json 2> >(grep -v -e 'cpuinfo' -e 'cpuid_info' >&2)
fi
"$HOST_PY" - "$RUN" "$QEMU_CPU" "$SUITE" <<'EOF'
import json, platform, subprocess, sys
from pathlib import Path
run = Path(sys.argv[1])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
env = {"emulator": subprocess.run(["qemu-aarch64-static", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
       "qemu_cpu": sys.argv[2], "debian": sys.argv[3], "device": json.loads((run / "device-env.json").read_text()),
       "host": {"machine": platform.machine(), "cpu": cpu, "python": platform.python_version()}}
(run / "env.json").write_text(json.dumps(env, indent=1))
EOF
"$HOST_PY" "$ROOT/tools/aarch64_report.py" "$RUN" "$OUT"
echo "wrote $OUT"
