"""A damaged store never reads as data: a deleted, truncated or overwritten chunk file of
a committed unit makes every reader stop with one line naming the unit, the array and
the file (docs/design.md#store-format), and `cast verify` says which file and how."""
from __future__ import annotations

import numpy as np
import pytest

import storage
from storage.check import verify
from storage.integrity import ChunkError
from tests.faults.conftest import DAMAGED_UNIT, cast, copy_pair, damage

FAULTS = ("deleted", "truncated", "overwritten")
ACT = "act/L01/resid"
NAMED = f"unit {DAMAGED_UNIT} (u{DAMAGED_UNIT:06d}) array "


@pytest.fixture
def damaged(pair, tmp_path, request):
    """A copy of the pair whose target store has `request.param` = (fault, array) injected."""
    fault, array = request.param
    root = copy_pair(pair, tmp_path / "pair")
    f = damage(root / "tgt.zarr", array, fault)
    return root, fault, array, f


def ids(params):
    return [f"{fault}-{array.replace('/', '_')}" for fault, array in params]


ACT_FAULTS = [(fault, ACT) for fault in FAULTS]


@pytest.mark.parametrize("damaged", ACT_FAULTS, ids=ids(ACT_FAULTS), indirect=True)
def test_a_read_fails_naming_unit_array_and_file(damaged):
    root, fault, array, f = damaged
    store = storage.open_store(root / "tgt.zarr")
    with pytest.raises(ChunkError) as e:
        store.array(1, "resid").compute()
    assert e.value.unit == DAMAGED_UNIT and e.value.array == array and e.value.file == str(f)
    assert NAMED + array in str(e.value) and str(f) in str(e.value)
    assert ("missing" in str(e.value)) == (fault == "deleted")


@pytest.mark.parametrize("damaged", ACT_FAULTS, ids=ids(ACT_FAULTS), indirect=True)
def test_inspect_fails(damaged, capsys):
    root, _, array, f = damaged
    code, out, err = cast(capsys, "inspect", root / "tgt.zarr")
    assert code == 2 and NAMED + array in err and str(f) in err
    assert "Traceback" not in err and "inf" not in out


@pytest.mark.parametrize("damaged", [(fault, "meta/char_end") for fault in FAULTS] + [("deleted", ACT)],
                         ids=ids([(fault, "meta/char_end") for fault in FAULTS] + [("deleted", ACT)]),
                         indirect=True)
def test_align_fails(damaged, capsys):
    """align reads the token metadata; a file missing anywhere in the store stops it too."""
    root, _, array, f = damaged
    code, _, err = cast(capsys, "align", root / "src.zarr", root / "tgt.zarr", "--out", root / "align2")
    assert code == 2 and NAMED + array in err and str(f) in err and "Traceback" not in err
    assert not (root / "align2").exists()


@pytest.mark.parametrize("damaged", ACT_FAULTS, ids=ids(ACT_FAULTS), indirect=True)
def test_layermap_fails(damaged, capsys):
    root, _, array, f = damaged
    code, _, err = cast(capsys, "layermap", root / "src.zarr", root / "tgt.zarr", "--align", root / "align",
                        "--out", root / "map2")
    assert code == 2 and NAMED + array in err and str(f) in err and "Traceback" not in err


@pytest.mark.parametrize("damaged", ACT_FAULTS, ids=ids(ACT_FAULTS), indirect=True)
def test_train_heads_fails(damaged, capsys):
    root, _, array, f = damaged
    code, _, err = cast(capsys, "train-heads", "--src-store", root / "src.zarr", "--tgt-store", root / "tgt.zarr",
                        "--align", root / "align", "--layermap", root / "map", "--sites", "resid",
                        "--kinds", "ridge", "--workers", "0", "--out", root / "heads", "--quiet")
    assert code == 2 and NAMED + array in err and str(f) in err and "Traceback" not in err
    assert "retry" not in err  # damage does not heal by retrying
    # Heads that other layers finished are kept (a rerun skips them); nothing empty, no index.
    heads = root / "heads"
    assert not (heads / "index.json").exists()
    assert not [d for d in [heads, *heads.rglob("*")] if d.is_dir() and not any(d.iterdir())]


@pytest.mark.parametrize("damaged", ACT_FAULTS, ids=ids(ACT_FAULTS), indirect=True)
def test_verify_names_the_file_and_says_missing(damaged, capsys):
    root, fault, array, f = damaged
    report = verify(root / "tgt.zarr")
    text = "\n".join(report.lines())
    assert not report.ok and f"unit {DAMAGED_UNIT}: {array}: " in text and str(f) in text
    assert ("chunk file is missing" in text) == (fault == "deleted")
    assert ("sha256" in text) is False  # the read itself fails: no hash of fill values is compared
    code, out, _ = cast(capsys, "verify", root / "tgt.zarr", "--quiet")
    assert code == 1 and str(f) in out


def test_undamaged_pair_reads_and_verifies(pair):
    store = storage.open_store(pair / "tgt.zarr")
    assert np.isfinite(store.array(1, "resid").compute()).all()
    assert verify(pair / "tgt.zarr").ok and verify(pair / "src.zarr").ok


def test_a_committed_unit_without_its_directory_is_an_error(pair, tmp_path):
    import shutil

    root = copy_pair(pair, tmp_path / "pair")
    shutil.rmtree(root / "tgt.zarr" / "units" / f"u{DAMAGED_UNIT:06d}")
    with pytest.raises(storage.StoreError, match=f"unit {DAMAGED_UNIT} is committed .* its directory .* missing"):
        storage.open_store(root / "tgt.zarr").array(1, "resid")
