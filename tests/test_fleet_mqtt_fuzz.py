"""MQTT job documents (the device's parser) and signed execution updates (the controller's), fuzzed with
hypothesis: random bytes, and well-signed documents with mutated fields. Only edgepeft's typed errors may
come out of the parsers, and the controller's gate refuses (counts) instead of raising. Bounded for the
default suite; ``-m slow`` runs the same properties on many more inputs."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepeft.errors import EdgePeftError

QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
LONG = settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats()
                           | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=5),
                           max_leaves=20)
JOB = {"job_id": "r1", "rollout": "r1", "device_id": "dev", "operation": "install", "issued": "2026-01-01T00:00:00Z",
       "expires": "2099-01-01T00:00:00Z", "repository": "http://127.0.0.1:9/",
       "package": {"path": "edgepeft/adapters/a/v2.epu", "id": "0" * 64, "name": "a", "version": 2, "type": "adapter"}}
REPORT = {"type": "execution-update", "device_id": "dev", "job_id": "r1", "rollout": "r1", "status": "SUCCEEDED",
          "seq": 5, "at": 1.0, "reason": None, "transient": False, "result": {"steps": []}}
RID = "r1"


@pytest.fixture(scope="module")
def keys():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    fleet, device = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    return {"fleet": fleet, "device": device}


def _signed_job(doc_text: str, key) -> bytes:
    from edgepeft.contracts.signing import sign_bytes

    return json.dumps({"document": doc_text, "signatures": [sign_bytes(doc_text.encode("utf-8", "surrogatepass"),
                                                                       key)]}).encode()


def _signed_report(text: str, key) -> bytes:
    from edgepeft.contracts.signing import sign_bytes

    return json.dumps({"report": text, "signatures": [sign_bytes(text.encode("utf-8", "surrogatepass"), key)]}).encode()


def _job_property(keys, raw, edits):
    from edgepeft.contracts.job import Job, verify_job

    pub = keys["fleet"].public_key()
    doc = {**JOB, **edits}
    for message in (raw, _signed_job(json.dumps(doc), keys["fleet"]), _signed_job(raw.decode("latin-1"), keys["fleet"])):
        try:
            assert isinstance(verify_job(message, [pub], device_id="dev"), Job)
        except EdgePeftError:
            pass


def _report_property(keys, raw, edits):
    from edgepeft.contracts.report import Report, parse_report
    from edgepeft.fleet.reports import ReportGate
    from edgepeft.transport.mqtt_plane import Incoming

    pub = keys["device"].public_key()
    gate = ReportGate(RID, {"dev": pub})
    doc = {**REPORT, **edits}
    messages = (raw, _signed_report(json.dumps(doc), keys["device"]), _signed_report(raw.decode("latin-1"), keys["device"]),
                _signed_report(json.dumps(doc), keys["fleet"]))
    for message in messages:
        try:
            assert isinstance(parse_report(message, pub, device_id="dev"), Report)
        except EdgePeftError:
            pass
        for kind in ("update", "state"):
            rep = gate.check(Incoming(kind, "dev", RID if kind == "update" else None, message))
            if rep is not None:  # taken only when it binds to this device, job and rollout
                assert rep.device_id == "dev" and (kind == "state" or (rep.job_id == RID and rep.rollout == RID))
    assert gate.refused["error"] == 0, gate.refused


@QUICK
@given(raw=st.binary(max_size=400), edits=st.dictionaries(st.sampled_from(sorted(JOB) + ["extra"]), json_values,
                                                          max_size=3))
def test_job_documents_give_only_typed_errors(keys, raw, edits):
    _job_property(keys, raw, edits)


@QUICK
@given(raw=st.binary(max_size=400), edits=st.dictionaries(st.sampled_from(sorted(REPORT) + ["extra", "base",
                                                                                             "adapters", "bundle"]),
                                                          json_values, max_size=3))
def test_execution_updates_give_only_typed_errors_and_the_gate_never_raises(keys, raw, edits):
    _report_property(keys, raw, edits)


def test_the_gate_takes_a_genuine_update_once(keys):
    """The property above must be able to pass a report: a genuine one is taken, its replay is not."""
    from edgepeft.contracts.report import sign_report
    from edgepeft.fleet.reports import ReportGate
    from edgepeft.transport.mqtt_plane import Incoming

    gate = ReportGate(RID, {"dev": keys["device"].public_key()})
    msg = Incoming("update", "dev", RID, sign_report(dict(REPORT), keys["device"]))
    assert gate.check(msg).status == "SUCCEEDED"
    assert gate.check(msg) is None and gate.refused == {"replayed": 1}
    junk = {k: v for k, v in REPORT.items() if k != "rollout"} | {"status": "REJECTED", "seq": 9}
    assert gate.check(Incoming("update", "dev", RID, sign_report(junk, keys["device"]))) is None
    assert gate.refused["unverified job"] == 1  # the device's answer to junk does not count


@pytest.mark.slow
@LONG
@given(raw=st.binary(max_size=2000), edits=st.dictionaries(st.sampled_from(sorted(JOB) + ["extra"]), json_values,
                                                           max_size=5))
def test_job_documents_long(keys, raw, edits):
    _job_property(keys, raw, edits)


@pytest.mark.slow
@LONG
@given(raw=st.binary(max_size=2000), edits=st.dictionaries(st.sampled_from(sorted(REPORT) + ["extra", "base",
                                                                                              "adapters", "bundle"]),
                                                           json_values, max_size=5))
def test_execution_updates_long(keys, raw, edits):
    _report_property(keys, raw, edits)
