"""A small tiny-model store pair (with alignment and layer map) made once, and the faults
the suite injects into copies of it: one chunk file deleted, truncated or overwritten."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from jobs.cli import main
from storage.layout import UNITS

EXTRACT = ["--max-tokens", "400", "--max-chars", "160", "--unit-tokens", "100", "--sites", "resid",
           "--workers", "0", "--quiet"]
DAMAGED_UNIT = 1


def cast(capsys, *argv) -> tuple[int, str, str]:
    """Run `cast ARGV` in this process: (exit status, stdout, stderr). An exception that
    escapes is a traceback the user would see, and fails the test."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def pair(tmp_path_factory, corpus_dir) -> Path:
    """src.zarr (tiny-llama), tgt.zarr (tiny-gemma3), align/, map/: every unit committed."""
    return make_pair(tmp_path_factory.mktemp("pair"), corpus_dir, EXTRACT)


def make_pair(root: Path, corpus_dir, extract: list[str]) -> Path:
    """Both tiny stores extracted with `extract`, aligned and layer-mapped under root."""
    for name, model in (("src", "tiny-llama"), ("tgt", "tiny-gemma3")):
        assert main(["extract", "--model", model, "--out", str(root / f"{name}.zarr"),
                     "--corpus", str(corpus_dir), *extract]) == 0
    assert main(["align", str(root / "src.zarr"), str(root / "tgt.zarr"), "--out", str(root / "align")]) == 0
    assert main(["layermap", str(root / "src.zarr"), str(root / "tgt.zarr"), "--align", str(root / "align"),
                 "--out", str(root / "map")]) == 0
    return root


def copy_pair(pair: Path, dest: Path) -> Path:
    shutil.copytree(pair, dest)
    return dest


def chunk_file(store: Path, array: str, unit: int = DAMAGED_UNIT) -> Path:
    """The one file holding `array` of a unit (format 3: one chunk or shard per array)."""
    files = [p for p in (store / UNITS / f"u{unit:06d}" / array / "c").rglob("*") if p.is_file()]
    assert len(files) == 1, files
    return files[0]


def damage(store: Path, array: str, fault: str) -> Path:
    """Inject one fault into `array` of unit DAMAGED_UNIT; returns the file."""
    f = chunk_file(store, array)
    data = f.read_bytes()
    if fault == "deleted":
        f.unlink()
    elif fault == "truncated":
        f.write_bytes(data[: len(data) // 2])
    elif fault == "overwritten":  # same length, bytes in the middle changed
        mid = len(data) // 2
        f.write_bytes(data[:mid] + bytes(b ^ 0x5A for b in data[mid:mid + 8]) + data[mid + 8:])
    else:
        raise ValueError(fault)
    return f
