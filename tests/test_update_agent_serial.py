"""Updates over a serial line: a real agent process on one end of a pseudo-terminal null modem (line
rate enforced), `edgepeft push --to serial://...` on the other; noise, half-frames, flipped bits and
an unplugged cable are survived; a bad package is refused with its reason."""

from __future__ import annotations

import json
import time

from agent_support import AgentProcess, run_cli
from test_runtime_support import require_fixtures
from update_support import forge, version_of

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.transport.framing import FrameDecoder, cobs_decode, cobs_encode, encode_frame  # noqa: E402
from edgepeft.transport.linesim import NullModem  # noqa: E402

Q = "héllo ☃"


def test_frames_survive_noise_and_resynchronize():
    import random

    rng = random.Random(5)
    for n in list(range(0, 300)) + [254, 255, 508, 4000]:
        data = bytes(rng.choice([0, 1, 254, 255, rng.randrange(256)]) for _ in range(n))
        enc = cobs_encode(data)
        assert b"\x00" not in enc and cobs_decode(enc) == data
    frames = [encode_frame(ord("D"), bytes([i]) * (i * 37 % 900)) for i in range(40)]
    stream = bytearray(b"\x13\x37garbage\x00")
    for i, f in enumerate(frames):
        if i % 7 == 3:
            f = f[:len(f) // 2]  # a half frame: dropped; the next frame's leading delimiter saves that one
        if i % 11 == 5:
            f = bytes([f[0] ^ 0x20]) + f[1:]  # a flipped bit
        stream += f
    dec = FrameDecoder()
    got = []
    for i in range(0, len(stream), 13):  # arrives in odd-sized pieces
        got += list(dec.feed(bytes(stream[i:i + 13])))
    lost = {i for i in range(40) if i % 7 == 3 or i % 11 == 5}
    good = [i for i in range(40) if i not in lost]
    assert [(k, b) for k, b in got] == [(ord("D"), bytes([i]) * (i * 37 % 900)) for i in good]
    assert dec.dropped >= 8  # the garbage, each half frame, each flipped frame


def _agent(built, tmp_path, line, baud):
    return AgentProcess(built["bundle"], built["public_key"], tmp_path / "state", "--serial", line.b, "--baud", baud)


def test_push_over_serial_with_noise_flipped_bits_and_an_unplugged_cable(built, tmp_path):
    baud = 115200
    with NullModem(baud, bit_error_rate=2e-6, seed=3) as line:
        agent = _agent(built, tmp_path, line, baud)
        try:
            assert agent.chat("alpha", Q)["adapter_version"] == 1
            to = f"serial://{line.a}?baud={baud}"
            # garbage and a half frame on the line before the sender starts
            line.noise(b"\xff\x00\x01\x02" * 40 + encode_frame(ord("D"), b"x" * 300)[:150], toward="b")
            pkg = version_of(built, tmp_path / "alpha-3.epu", 3)
            t0 = time.monotonic()
            r = run_cli("push", pkg, "--to", to, "--json", timeout=180)
            assert r.returncode == 0, r.stderr + r.stdout
            st = json.loads(r.stdout)
            assert st["status"] == "healthy" and st["version"] == 3, st
            assert time.monotonic() - t0 > pkg.stat().st_size * 10 / baud  # the line rate really was enforced
            assert agent.chat("alpha", Q)["adapter_version"] == 3
            # the cable is pulled for 2 s at 40 % of the next transfer: the sender goes back to
            # what the device acknowledged and finishes
            from edgepeft.transport.link import Package, push
            from edgepeft.transport.serial_link import SerialLink

            pkg4 = Package.read(version_of(built, tmp_path / "alpha-4.epu", 4))
            pulled = []

            def progress(done, total):
                if not pulled and done > 0.4 * total:
                    pulled.append(done)
                    line.unplug(2.0)
            link = SerialLink(line.a, baud)
            try:
                st = push(pkg4, link, progress=progress, timeout=120)
            finally:
                link.close()
            assert pulled and st["status"] == "healthy" and st["version"] == 4, st
            assert line.carried[0] > pkg4.size * 1.05  # what was lost on the floor was sent again
            assert agent.chat("alpha", Q)["adapter_version"] == 4
            r = run_cli("status", "--device", to, "--json")
            assert r.returncode == 0, r.stderr
            dev = json.loads(r.stdout)
            assert next(a for a in dev["adapters"] if a["name"] == "alpha")["version"] == 4
            # a package for another base: refused over serial too, with the reason; v3 keeps serving
            bad = tmp_path / "bad.epu"

            def other_base(m):
                m["base_fingerprint"] = m["adapter"]["base_fingerprint"] = "cd" * 32
                m["adapter"]["version"] = 5
            bad.write_bytes(forge(pkg.read_bytes(), built["private_key"], mutate=other_base))
            r = run_cli("push", bad, "--to", to, "--json", timeout=120)
            assert r.returncode != 0
            st = json.loads(r.stdout)
            assert st["status"] == "rejected" and "built for base" in st["reason"]
            assert agent.chat("alpha", Q)["adapter_version"] == 4
        finally:
            agent.stop()
