"""JSON from a peer goes through one parse (contracts.jsontext): a nesting deeper than the interpreter's
recursion limit is a ValueError like any other malformed JSON, never a RecursionError that escapes a
push, a rollout's link or the CLI as a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edgepeft.contracts.jsontext import loads_untrusted
from edgepeft.contracts.update import encode_envelope
from edgepeft.errors import TransportError
from edgepeft.transport import serial_proto as sp
from edgepeft.transport.framing import encode_frame
from edgepeft.transport.http import HttpLink
from edgepeft.transport.link import LinkDown
from edgepeft.transport.serial_link import SerialLink

DEEP = b"[" * 50_000


def test_a_deep_nesting_is_a_value_error():
    with pytest.raises(RecursionError):
        json.loads(DEEP)  # what every caller used to see
    with pytest.raises(ValueError, match="nests too deeply"):
        loads_untrusted(DEEP)
    assert loads_untrusted(b'{"a": [1]}') == {"a": [1]}


@pytest.mark.parametrize("answer", [DEEP, b"[1, 2]", b"not json"])
def test_an_http_device_answering_garbage_is_a_transport_error(answer):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(500)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        link = HttpLink(f"http://127.0.0.1:{server.server_address[1]}", "t", timeout=5)
        with pytest.raises(TransportError, match="answered 500"):
            link.status("ab" * 32)
        link.close()
    finally:
        server.shutdown()
        server.server_close()


class FakeSerial:
    """Answers every request (a QUERY here) with the next of ``answers`` (the last one repeats)."""

    def __init__(self, answers):
        self.answers, self.out, self.in_waiting = list(answers), bytearray(), 0

    def write(self, data):
        body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        self.out += encode_frame(sp.REPLY, bytes([sp.QUERY]) + body)
        self.in_waiting = len(self.out)

    def read(self, n):
        data, self.out = bytes(self.out), bytearray()
        self.in_waiting = 0
        return data


def test_a_serial_device_answering_a_deep_nesting_is_ignored_like_noise():
    link = SerialLink("fake", serial_factory=lambda: FakeSerial([DEEP, b'{"status": "receiving", "offset": 3}']),
                      reply_timeout=0.05, window=64)
    assert link.status("ab" * 32) == {"status": "receiving", "offset": 3}
    link = SerialLink("fake", serial_factory=lambda: FakeSerial([DEEP]), reply_timeout=0.05, window=64)
    with pytest.raises(LinkDown):
        link.status("ab" * 32)


@pytest.mark.parametrize("meta", [DEEP, b"{not json"])
def test_update_inspect_of_metadata_that_is_not_json_is_one_line(tmp_path, meta):
    package = tmp_path / "bad.epu"
    package.write_bytes(encode_envelope(meta, [{"algorithm": "ed25519", "key_id": "x", "value": "AA=="}]))
    proc = subprocess.run([sys.executable, "-m", "edgepeft", "update", "inspect", str(package)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"error: {package}: metadata is not JSON: " + (
        "it nests too deeply to be a message of this project" if meta == DEEP else
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)")]
