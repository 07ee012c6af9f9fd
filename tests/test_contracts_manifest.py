"""Manifest schema, signing and verification: every tampering is detected on load."""

from __future__ import annotations

import json
import shutil

import pytest

from edgepeft.contracts import Manifest, sha256_file, verify_bundle
from edgepeft.contracts.signing import generate_keypair, load_private_key, sign_manifest
from edgepeft.errors import IntegrityError, SignatureError, SpecError


def _write_bundle(root, private_key_path, graph: bytes = b"graph" * 100):
    root.mkdir()
    (root / "model.onnx").write_bytes(graph)
    (root / "adapters").mkdir()
    (root / "adapters" / "support-1.onnx_adapter").write_bytes(b"\x01\x02" * 50)
    files = [{"path": p, "size": (root / p).stat().st_size, "sha256": sha256_file(root / p)}
             for p in ("model.onnx", "adapters/support-1.onnx_adapter")]
    data = {
        "schema_version": 1, "kind": "bundle", "edgepeft_version": "0.1.0", "created": "2026-11-22T00:00:00Z",
        "base": {"name": "tiny", "fingerprint": "sha256:ab", "task": "causal-lm", "architecture": "llama"},
        "target": {"name": "raspberry-pi-5"}, "quantization": {"weights": "int4"},
        "model": {"graph": "model.onnx"}, "tokenizer": {"file": "tokenizer.json"}, "generation": {},
        "files": files,
        "adapters": [{"name": "support", "version": 1, "file": "adapters/support-1.onnx_adapter", "method": "lora",
                      "rank": 8, "alpha": 16.0, "base_fingerprint": "sha256:ab"}],
        "health_checks": [{"input": "hi", "expect": {"contains": "Northwind"}, "adapter": "support"}],
        "merged_adapter": None,
    }
    signed = sign_manifest(data, load_private_key(private_key_path))
    (root / "manifest.json").write_text(json.dumps(signed, indent=2))
    return signed


@pytest.fixture
def bundle(tmp_path, keypair):
    _write_bundle(tmp_path / "b", keypair[0])
    return tmp_path / "b"


def test_verify_good_bundle_round_trips(bundle, keypair):
    m = verify_bundle(bundle, [keypair[1]])
    assert m.adapter("support").rank == 8 and m.health_checks[0].expect == {"contains": "Northwind"}
    again = Manifest.from_dict(m.to_dict())
    assert again == m


@pytest.mark.parametrize("victim", ["model.onnx", "adapters/support-1.onnx_adapter"])
def test_flipped_byte_is_detected(bundle, keypair, victim):
    data = bytearray((bundle / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / victim).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="SHA-256"):
        verify_bundle(bundle, [keypair[1]])


def test_truncated_and_missing_files_are_detected(bundle, keypair):
    (bundle / "model.onnx").write_bytes(b"graph")
    with pytest.raises(IntegrityError, match="bytes"):
        verify_bundle(bundle, [keypair[1]])
    (bundle / "model.onnx").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        verify_bundle(bundle, [keypair[1]])


def test_edited_manifest_is_detected(bundle, keypair):
    data = json.loads((bundle / "manifest.json").read_text())
    data["adapters"][0]["rank"] = 4
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SignatureError, match="does not match"):
        verify_bundle(bundle, [keypair[1]])


def test_wrong_key_missing_signature_and_no_key(bundle, keypair, tmp_path):
    _, other_pub = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError, match="does not trust"):
        verify_bundle(bundle, [other_pub])
    with pytest.raises(SignatureError, match="no trusted public key"):
        verify_bundle(bundle, [])
    with pytest.raises(SignatureError, match="not a PEM public key"):
        verify_bundle(bundle, [keypair[0]])
    data = json.loads((bundle / "manifest.json").read_text())
    del data["signature"]
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SignatureError, match="not signed"):
        verify_bundle(bundle, [keypair[1]])


def test_resigned_with_an_attackers_key_is_refused(bundle, keypair, tmp_path):
    evil_priv, _ = generate_keypair(tmp_path / "evil")
    data = json.loads((bundle / "manifest.json").read_text())
    data["adapters"][0]["version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(sign_manifest(data, load_private_key(evil_priv))))
    with pytest.raises(SignatureError, match="does not trust"):
        verify_bundle(bundle, [keypair[1]])


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("base"), "base"),
    (lambda d: d["files"][0].update(sha256="xyz"), "files[0].sha256"),
    (lambda d: d["files"][0].update(path="../etc/passwd"), "files[0].path"),
    (lambda d: d["adapters"][0].update(name="bad name!"), "adapters[0].name"),
    (lambda d: d["adapters"][0].update(method="prefix_tuning"), "adapters[0].method"),
    (lambda d: d["adapters"][0].update(file="adapters/nope.onnx_adapter"), "adapters[0].file"),
    (lambda d: d["health_checks"][0].update(adapter="ghost"), "health_checks[0].adapter"),
    (lambda d: d.update(schema_version=7), "schema_version"),
])
def test_malformed_manifest_names_the_field(bundle, keypair, mutate, field):
    data = json.loads((bundle / "manifest.json").read_text())
    mutate(data)
    (bundle / "manifest.json").write_text(json.dumps(sign_manifest(data, load_private_key(keypair[0]))))
    with pytest.raises(SpecError) as info:
        verify_bundle(bundle, [keypair[1]])
    assert info.value.field == field


def test_not_json(bundle, keypair):
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(SpecError, match="not readable JSON"):
        verify_bundle(bundle, [keypair[1]])
    shutil.rmtree(bundle)
    with pytest.raises(SpecError, match="does not exist"):
        verify_bundle(bundle, [keypair[1]])


@pytest.mark.parametrize("edit, error, match", [
    (lambda t: t.replace('"alpha": 16.0', '"alpha": NaN'), SpecError, "NaN is not JSON"),
    (lambda t: t.replace('"alpha": 16.0', '"alpha": 16.0, "alpha": 99.0'), SpecError, "'alpha' appears twice"),
    (lambda t: t.replace('"name": "tiny"', '"name": "\\ud800"'), SignatureError, "canonical signed form"),
])
def test_json_that_parsers_read_differently_is_refused(bundle, keypair, edit, error, match):
    """Duplicate keys (which one wins differs between parsers), NaN and lone surrogates (no canonical
    form) would let a non-Python verifier check other bytes than edgepeft does: refused, typed."""
    path = bundle / "manifest.json"
    path.write_text(edit(path.read_text()))
    with pytest.raises(error, match=match):
        verify_bundle(bundle, [keypair[1]])


def test_verified_files_are_sealed_copies_of_what_was_hashed(bundle, keypair):
    """The graph and bundled adapters reach the engine as a sealed in-memory file made while hashing: a write to
    the bundle afterwards changes nothing, and nobody (this process included) can write to the copy."""
    import os

    from edgepeft.contracts.verify import BundleFiles

    files = BundleFiles(bundle)
    m = verify_bundle(files, [keypair[1]])
    entry = m.file("model.onnx")
    vf = files.open_verified(entry)
    view = vf.view()
    (bundle / "model.onnx").write_bytes(b"X" * entry.size)  # replaced after the check
    assert bytes(view) == b"graph" * 100
    if isinstance(vf.source, str):  # Linux: a sealed memfd
        with pytest.raises(PermissionError):
            with open(vf.source, "r+b") as fh:
                fh.write(b"tampered")
        fd = os.open(vf.source, os.O_RDONLY)
        try:
            assert os.read(fd, 10) == b"graphgraph"
        finally:
            os.close(fd)
    vf.close()
    assert bytes(view[:5]) == b"graph"  # the view outlives the file
    with pytest.raises(IntegrityError, match="SHA-256"):
        files.open_verified(entry)


def test_a_graph_of_many_blocks_is_hashed_whole_beside_its_copy(tmp_path, keypair):
    """The sealed copy is hashed on another thread while it is written, block by block: every block counts, the
    last and a short one included, and the copy holds exactly what was hashed."""
    import os

    from edgepeft.contracts.verify import BundleFiles

    graph = os.urandom((5 << 20) + 12345)  # several read blocks and a short last one
    _write_bundle(tmp_path / "b", keypair[0], graph)
    files = BundleFiles(tmp_path / "b")
    entry = verify_bundle(files, [keypair[1]], check_files=False).file("model.onnx")
    vf = files.open_verified(entry)
    assert bytes(vf.view()) == graph
    vf.close()
    for where in (0, 3 << 20, len(graph) - 1):  # a flipped byte in the first, a middle and the last block
        bad = bytearray(graph)
        bad[where] ^= 1
        (tmp_path / "b" / "model.onnx").write_bytes(bytes(bad))
        with pytest.raises(IntegrityError, match="SHA-256"):
            files.open_verified(entry)


def test_sealing_waits_out_busy_pages_and_fails_clearly_when_they_stay_busy():
    """The kernel refuses the write seal while a writable shared mapping of the memfd exists (EBUSY, as
    when another kernel user briefly holds one of its pages): the seal is tried again, and takes once the
    mapping is gone; a mapping that never goes gives a typed error instead of an OSError."""
    import fcntl
    import mmap
    import os

    from edgepeft.contracts.verify import _seal

    if not hasattr(os, "memfd_create") or not hasattr(fcntl, "F_ADD_SEALS"):
        pytest.skip("memfds are Linux-only")
    fd = os.memfd_create("seal-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, b"graph" * 1000)
        busy = mmap.mmap(fd, 5000, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(IntegrityError, match="cannot be sealed") as ei:
            _seal(fd, "model.onnx", tries=2)
        assert ei.value.hint
        waits = []

        def mapping_goes(seconds):  # the mapping goes while the seal waits to try again
            waits.append(seconds)
            busy.close()

        _seal(fd, "model.onnx", wait=mapping_goes)
        assert len(waits) == 1  # refused once (busy), then sealed
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
        with pytest.raises(PermissionError):
            os.write(fd, b"x")
    finally:
        os.close(fd)


def test_public_keys_read_without_the_serialization_package_agree_with_cryptography(keypair, tmp_path):
    """The Ed25519 PEM fast path (opening a bundle skips cryptography's PEM loader) reads the same key, and
    any other PEM key still goes through cryptography and is refused with its reason."""
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from edgepeft.contracts.verify import key_id, load_public_key

    pem = Path(keypair[1]).read_bytes()
    mine, theirs = load_public_key(pem), serialization.load_pem_public_key(pem)
    assert mine.public_bytes_raw() == theirs.public_bytes_raw() and key_id(mine) == key_id(theirs)
    assert load_public_key(pem.replace(b"\n", b"\r\n")).public_bytes_raw() == theirs.public_bytes_raw()
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(SignatureError, match="not an Ed25519 key"):
        load_public_key(ec_pem)
    with pytest.raises(SignatureError, match="not a PEM public key"):
        load_public_key(pem[:40] + b"!" + pem[41:])
