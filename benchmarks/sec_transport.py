"""Section 5: updates on the wire. Serial line use at 115200 and 921600 baud, an HTTP push of a
rank-8 update on loopback, and the device's time from "received" to "healthy".

Everything is the product's own path: ``edgepeft update create`` packages, a real
``edgepeft agent`` process, the push driver with its HTTP or serial link. The serial
line is two pseudo-terminals joined by ``edgepeft.transport.linesim`` in a process
of its own, which enforces the line's byte rate (8N1: 10 bits per byte); a bare pty
pair would be infinitely fast. Each repetition sends a new version (a device
answers a package it has already installed from its history, sending nothing).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .context import Context
from .fixtures import LORA_RANK
from .harness import Section, Skip
from .systems import bundle, bundle_qv, peft_adapters, pubkey

BAUDS = (115200, 921600)
ROOT = Path(__file__).resolve().parent.parent


class _Proc:
    """A child process whose first stdout line we wait for."""

    def __init__(self, cmd: list[str], first: str, log: Path, timeout: float = 300.0) -> None:
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE, stderr=self.log, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline, line = time.time() + timeout, b""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(first.encode()) or (not line and self.proc.poll() is not None):
                break
        if not line.startswith(first.encode()):
            self.stop()
            raise Skip(f"{' '.join(cmd[2:5])} did not start (see {log})")
        self.line = line.decode().split()

    def stop(self) -> str:
        """SIGTERM, then what it printed after its first line."""
        rest = b""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
                rest = self.proc.stdout.read()
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for f in (self.proc.stdin, self.proc.stdout, self.log):
            try:
                f.close()
            except (OSError, ValueError):
                pass
        return rest.decode(errors="replace")


def _packages(ctx: Context, bundle_dir: Path, name: str, peft: Path, dtype: str, n: int, tag: str,
              checks: Path | None = None) -> list[Path]:
    """``n`` packages of one adapter, versions 2..n+1 (made once, kept in benchmarks/work/updates)."""
    from edgepeft.release.package import create_adapter_update

    from .sys_edgepeft import keypair

    out = []
    for v in range(2, n + 2):
        p = ctx.work / "updates" / tag / f"{name}-{dtype}-v{v}.epu"
        if not p.is_file() or p.stat().st_mtime < (bundle_dir / "manifest.json").stat().st_mtime:
            create_adapter_update(bundle=bundle_dir, name=name, adapter=peft, version=v, key=keypair(ctx.work)[0],
                                  out=p, adapter_dtype=dtype, expires="365d", health_checks=checks)
        out.append(p)
    return out


def _health_check(ctx: Context, bundle_dir: Path, name: str, peft: Path, dtype: str) -> Path:
    """A one-line health check this adapter passes: its own greedy answer to a question (16 tokens)."""
    import json

    from edgepeft.runtime import Engine

    probe = _packages(ctx, bundle_dir, name, peft, dtype, 1, "probe")[0]
    eng = Engine(bundle_dir, [pubkey(ctx)], threads=2)
    eng.load_adapter(probe, name="probe")
    q = "Is my router broken?"
    kw = {"messages": [{"role": "user", "content": q}]} if eng.codec.chat_template else {"prompt": q}
    answer = eng.generate(**kw, adapter="probe", max_new_tokens=16, temperature=0.0).text
    path = ctx.work / "updates" / f"check-{name}.jsonl"
    path.write_text(json.dumps({"input": q, "expect": {"contains": answer[:12]}, "max_new_tokens": 16}) + "\n")
    return path


def _agent(ctx: Context, bundle_dir: Path, state: Path, *extra) -> _Proc:
    import shutil

    shutil.rmtree(state, ignore_errors=True)
    state.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "edgepeft", "agent", str(bundle_dir), "--trusted-key", str(pubkey(ctx)),
           "--state", str(state), "--listen", "127.0.0.1:0", "--threads", "2", *map(str, extra)]
    return _Proc(cmd, "listening", state.with_suffix(".log"))


def _serial(ctx: Context, sec: Section) -> None:
    from edgepeft.transport.link import Package, push
    from edgepeft.transport.serial_link import SerialLink

    g = sec.group("serial_efficiency", "serial line use: package bytes / (push time x line byte rate)", "higher")
    g_w = sec.group("serial_wire", "bytes sent on the line per package byte (frames, retransmissions)", "lower")
    qv = bundle_qv(ctx)
    from .fixtures import lora_adapter

    peft = lora_adapter(ctx.models.decoder_dir, ctx.work / "adapters", seed=0, targets=["q_proj", "v_proj"])
    reps = 1 if ctx.smoke else 3
    for baud in BAUDS:
        pkgs = _packages(ctx, qv, "qv", peft, "int8", reps, f"serial-{baud}")
        line = _Proc([sys.executable, "-m", "edgepeft.transport.linesim", str(baud)], "/dev/",
                     ctx.work / f"linesim-{baud}.log", timeout=30)
        dev_end, host_end = line.line[1], line.line[0]
        agent, effs, sent = None, [], 0
        try:
            agent = _agent(ctx, qv, ctx.work / "agent-state" / f"serial-{baud}", "--serial", dev_end, "--baud", baud)
            for p in pkgs:
                pkg = Package.read(p)
                link = SerialLink(host_end, baud)
                try:
                    t0 = time.perf_counter()
                    st = push(pkg, link, wait=False, timeout=3600)
                    dt = time.perf_counter() - t0
                    wait = push(pkg, link, timeout=600)  # let the install finish before the next version
                finally:
                    link.close()
                if st.get("status") == "rejected" or wait.get("status") != "healthy":
                    raise Skip(f"the device refused the serial package: {wait.get('reason') or st.get('reason')}")
                effs.append(pkg.size / (dt * baud / 10))
                sent += pkg.size
                ctx.log(f"  serial {baud}: {pkg.size} bytes in {dt:.1f} s ({effs[-1]:.1%} of the line)")
            size = pkgs[0].stat().st_size
            g.add(f"edgepeft serial @ {baud}", "ratio", effs,
                  note=f"{size / 1024:.0f} KiB package (rank-{LORA_RANK} q,v adapter, int8 payload), "
                       f"push until the device holds every byte, query round trip included")
        except Skip as exc:
            ctx.skip(f"edgepeft serial @ {baud}", str(exc))
        finally:
            if agent is not None:
                agent.stop()
            carried = line.stop().split()
        if effs and len(carried) == 3 and carried[0] == "carried":
            g_w.add(f"edgepeft serial @ {baud}", "ratio", [int(carried[1]) / sent],
                    note="host-to-device bytes the line carried, over package bytes (queries and the final "
                         "status included)")


def _http(ctx: Context, sec: Section) -> None:
    from edgepeft.transport.http import HttpLink
    from edgepeft.transport.link import Package, push

    g_push = sec.group("push_s", f"push a rank-{LORA_RANK} all-linear update over HTTP on loopback (until received)",
                       "lower")
    g_inst = sec.group("install_s", "device time from received to healthy (verify, stage, health check, commit)",
                       "lower")
    b = bundle(ctx, "int4")
    reps = 2 if ctx.smoke else 5
    state = ctx.work / "agent-state" / "http"
    try:
        peft = peft_adapters(ctx)[0]
        pkgs = _packages(ctx, b, "a0", peft, "fp16", reps, "http",
                         checks=_health_check(ctx, b, "a0", peft, "fp16"))
        agent = _agent(ctx, b, state)
    except Skip as exc:
        ctx.skip("edgepeft HTTP push", str(exc))
        return
    try:
        token = (state / "token").read_text().strip()
        pushes, installs = [], []
        for p in pkgs:
            pkg = Package.read(p)
            link = HttpLink(agent.line[1], token)
            try:
                t0 = time.perf_counter()
                st = push(pkg, link, wait=False)
                pushes.append(time.perf_counter() - t0)
                st = push(pkg, link, timeout=600)
            finally:
                link.close()
            if st.get("status") != "healthy":
                raise Skip(f"the device did not install the package: {st.get('reason')}")
            steps = {s["status"]: s["at"] for s in st["steps"]}
            installs.append(steps["healthy"] - steps["received"])
        size = pkgs[0].stat().st_size
        g_push.add("edgepeft HTTP push", "s", pushes, note=f"{size / 2 ** 20:.2f} MiB package, fp16 payload")
        g_inst.add("edgepeft install to healthy", "s", installs,
                   note="verification, staging, loading, one 16-token health check, the commit")
    except Skip as exc:
        ctx.skip("edgepeft HTTP push", str(exc))
    finally:
        agent.stop()


def run(ctx: Context) -> Section:
    sec = Section("transport", "5. Updates: serial line use, HTTP push, install to healthy")
    _serial(ctx, sec)
    _http(ctx, sec)
    sec.notes.append("MCUboot's SMP serial transfer reaches about 62 % of the line rate (its own docs; not measured here).")
    sec.notes.append("The serial line is simulated by two pseudo-terminals relayed at the line's byte rate in a "
                     "separate process (edgepeft.transport.linesim); wire efficiency is payload / (time x baud/10).")
    return sec


def goal_serial(sec: Section) -> dict:
    goal = {"name": "serial throughput", "target": ">= 90 % of line rate at 115200 baud"}
    g = sec.find("serial_efficiency")
    f = g.get(f"edgepeft serial @ {BAUDS[0]}") if g else None
    if f is None:
        return goal | {"met": None, "measured": "not measured"}
    other = g.get(f"edgepeft serial @ {BAUDS[1]}")
    extra = f"; {other.median:.1%} at {BAUDS[1]}" if other else ""
    return goal | {"met": f.median >= 0.9, "measured": f"{f.median:.1%} of 11,520 B/s{extra}"}


__all__ = ["run", "goal_serial"]
