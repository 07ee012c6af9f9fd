"""The one atomic write (edgepeft.fsio): whole old or whole new file, the mode asked for, no temporaries left."""

from __future__ import annotations

import os
import stat

import pytest

from edgepeft.fsio import FaultyIO, PowerCut, atomic_path, write_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_atomic_takes_bytes_and_text_and_replaces_the_old_file(tmp_path):
    target = tmp_path / "state.json"
    write_atomic(target, b"old")
    write_atomic(target, "néw")
    assert target.read_bytes() == "néw".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_key_is_created_with_its_mode_and_replaces_a_readable_file(tmp_path):
    key = tmp_path / "k.key"
    key.write_bytes(b"old")
    key.chmod(0o644)
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        write_atomic(key, b"secret", mode=0o600)
    finally:
        os.umask(old_umask)
    assert _mode(key) == 0o600 and key.read_bytes() == b"secret"


def test_keep_existing_lets_the_first_file_win(tmp_path):
    target = tmp_path / "token"
    write_atomic(target, "first", mode=0o600, keep_existing=True)
    write_atomic(target, "second", mode=0o600, keep_existing=True)
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["token"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_every_step_goes_through_the_io_so_a_power_cut_can_strike_between_them(tmp_path):
    counting = FaultyIO()
    write_atomic(tmp_path / "a", b"x", io=counting)
    assert [op.split()[0] for op in counting.ops] == ["write", "fsync", "rename", "fsync-dir"]
    for n in range(1, 5):
        target = tmp_path / f"cut{n}"
        target.write_bytes(b"old")
        faulty = FaultyIO(cut_at=n)
        with pytest.raises(PowerCut):
            write_atomic(target, b"new", io=faulty)
        assert target.read_bytes() in {b"old", b"new"}, n
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
