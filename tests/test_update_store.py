"""Adapter store: atomic installs, rollback, health-check rollback, and a power cut at every write."""

from __future__ import annotations

import shutil

import pytest

from edgepeft.errors import StoreError
from edgepeft.update.fsio import FaultyIO, FileIO, PowerCut
from edgepeft.update.store import AdapterStore, sha256_file, version_key


@pytest.fixture()
def files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    old = src / "old.onnx_adapter"
    new = src / "new.onnx_adapter"
    old.write_bytes(b"OLD-" * 5000)
    new.write_bytes(b"new!" * 7000)
    return old, new


def _fingerprint(store: AdapterStore, name: str):
    """(version, bytes of the current file) after checking the file against its recorded hash."""
    cur = store.current(name)
    if cur is None:
        return None, None
    assert sha256_file(cur.path) == cur.sha256
    return cur.version, cur.path.read_bytes()


def test_version_key_orders_numerically():
    assert version_key("1.10") > version_key("1.9")
    assert version_key("2") > version_key("1.99.1")
    assert version_key("3") == version_key("3")


def test_install_switch_keep_previous_and_rollback(tmp_path, files):
    old, new = files
    store = AdapterStore(tmp_path / "store")
    store.install("support", "1", old, meta={"rank": 8})
    store.install("support", "2", new, sha256=sha256_file(new))
    assert store.current("support").version == "2"
    assert store.previous("support").version == "1"
    assert store.current("support").meta == {}
    # reopen: same state
    store2 = AdapterStore(tmp_path / "store")
    assert _fingerprint(store2, "support") == ("2", new.read_bytes())
    back = store2.rollback("support", "operator asked")
    assert back.version == "1" and store2.state("support")["rejected"]["reason"] == "operator asked"
    assert _fingerprint(AdapterStore(tmp_path / "store"), "support") == ("1", old.read_bytes())
    with pytest.raises(StoreError, match="no previous"):
        store2.rollback("support")


def test_refuses_replay_bad_hash_and_bad_names(tmp_path, files):
    old, new = files
    store = AdapterStore(tmp_path / "store")
    store.install("a", "2", old)
    with pytest.raises(StoreError, match="not newer") as ei:
        store.install("a", "1", new)
    assert ei.value.hint
    with pytest.raises(StoreError, match="not newer"):
        store.install("a", "2", new)
    with pytest.raises(StoreError, match="sha256"):
        store.install("a", "3", new, sha256="sha256:" + "0" * 64)
    with pytest.raises(StoreError, match="invalid adapter name"):
        store.install("../evil", "3", new)
    with pytest.raises(StoreError, match="invalid adapter version"):
        store.install("a", "3/../../x", new)
    assert _fingerprint(store, "a") == ("2", old.read_bytes())


def test_health_check_failure_rolls_back_and_says_why(tmp_path, files):
    old, new = files
    store = AdapterStore(tmp_path / "store")
    store.install("a", "1", old)
    seen = []

    def check(stored):
        seen.append(stored.version)
        raise RuntimeError("expected 'positive', got 'negative' for input #0")

    with pytest.raises(StoreError, match="rolled back to 1: expected 'positive'"):
        store.install("a", "2", new, health_check=check)
    assert seen == ["2"]
    assert _fingerprint(store, "a") == ("1", old.read_bytes())
    assert store.state("a")["rejected"]["version"] == "2"
    assert not list((tmp_path / "store" / "a").glob("v-2*"))
    # first install failing its check leaves nothing installed
    with pytest.raises(StoreError, match="rolled back to nothing"):
        store.install("b", "1", new, health_check=check)
    assert store.current("b") is None and "b" not in store.names()


def test_damaged_current_falls_back_to_previous(tmp_path, files):
    old, new = files
    store = AdapterStore(tmp_path / "store")
    store.install("a", "1", old)
    cur = store.install("a", "2", new)
    cur.path.write_bytes(b"flipped" + cur.path.read_bytes()[7:])
    reopened = AdapterStore(tmp_path / "store")
    assert _fingerprint(reopened, "a") == ("1", old.read_bytes())
    assert reopened.recovered and "damaged" in reopened.recovered[0]


def _prepared(tmp_path, old, tag):
    root = tmp_path / f"store-{tag}"
    AdapterStore(root).install("a", "1", old)
    return root


@pytest.mark.parametrize("health", ["passes", "fails"])
def test_power_cut_at_every_write_leaves_old_or_new(tmp_path, files, health):
    """Cut the power at operation N (write, fsync, rename, unlink...) for every N of an install.

    Unsynced data is lost at the cut (FaultyIO truncates it). Reopening must always find
    exactly version 1 with its bytes or version 2 with its bytes, never a mix or nothing.
    """
    old, new = files

    def check(stored):
        if health == "fails":
            raise RuntimeError("bad answer")

    # count the operations of one complete install
    root = _prepared(tmp_path, old, "count")
    store = AdapterStore(root)
    store.io = FaultyIO(cut_at=None)
    try:
        store.install("a", "2", new, health_check=check)
    except StoreError:
        assert health == "fails"
    total = len(store.io.ops)
    assert total >= 8, store.io.ops
    ops = list(store.io.ops)

    outcomes = set()
    for n in range(1, total + 1):
        root = _prepared(tmp_path, old, n)
        store = AdapterStore(root)
        store.io = FaultyIO(cut_at=n)
        with pytest.raises(PowerCut):
            store.install("a", "2", new, health_check=check)
        after = AdapterStore(root, io=FileIO())
        got = _fingerprint(after, "a")
        assert got in {("1", old.read_bytes()), ("2", new.read_bytes())}, (n, ops[n - 1])
        outcomes.add(got[0])
        # leftovers are cleaned: only referenced versions remain, no temporaries
        names = {p.name for p in (root / "a").iterdir()}
        assert not [x for x in names if x.endswith(".tmp")], (n, names)
        shutil.rmtree(root)
    # cuts before the switch keep the old version; after it (health passing) the new one stands
    assert "1" in outcomes
    if health == "passes":
        assert "2" in outcomes
