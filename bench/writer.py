"""(w) of `cast bench`: the store's unit writer alone, against a plain sequential write of
the same bytes to the same disk.

Extraction on a GPU forwards a unit in a fraction of the time its write takes on the CPU;
then the writer is the limit, and this measurement says how far away that limit is. Both
methods take the same units, captured from one extraction and kept in memory, so neither
includes a forward pass:

  writer  storage.writer.write_unit for every unit (chunk files, crc32c, rename, manifest
          row) into a fresh store, as the extraction worker's writer thread runs it;
  plain   every unit's activation and token arrays written, uncompressed, one after the
          other into one file: the disk's sequential rate for these bytes.

Both end by fsync-ing what they wrote, and the time includes it: over a long extraction
the page cache only absorbs the first few GB, after which what is sustained is what
reaches the disk. MB/s are of the raw (uncompressed) bytes, the same for both, so the
writer's compression shows as a gain, its CPU cost as a loss.
"""
from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def payload_bytes(units: list[tuple]) -> int:
    """Raw bytes of the captured units: activations and token metadata."""
    return sum(sum(a.nbytes for a in acts.values()) + sum(t.nbytes for t in tokens.values())
               for _, _, tokens, acts, *_ in units)


def fsync_tree(root: Path) -> None:
    """fsync every file under root, then the directories (the renames). Many threads at
    once (fsync releases the GIL), so the filesystem can commit them in one journal
    transaction: one fsync per file, one after another, would time the journal, not the
    bytes."""
    files, dirs = [], []
    for here, _, names in os.walk(root):
        dirs.append(here)
        files.extend(os.path.join(here, n) for n in names)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(_fsync, files))
        list(pool.map(_fsync, dirs))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteMethods:
    """The timed methods of (w) over units captured by bench.extraction.Methods.capture."""

    def __init__(self, units: list[tuple], meta: dict, work: Path):
        if not units:
            raise ValueError("(w) needs at least one captured unit")
        self.units, self.meta, self.work = units, meta, work
        self.nbytes = payload_bytes(units)
        self.tokens = sum(len(tokens["token_id"]) for _, _, tokens, *_ in units)

    def writer(self, rep: int) -> float:
        from storage.writer import create_store, write_unit

        path = self.work / f"writer-{rep}.zarr"
        create_store(path, self.meta)
        t0 = time.perf_counter()
        for args in self.units:
            write_unit(path, *args[1:])
        fsync_tree(path)
        dt = time.perf_counter() - t0
        shutil.rmtree(path, ignore_errors=True)
        return dt

    def plain(self, rep: int) -> float:
        path = self.work / f"plain-{rep}.bin"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            for _, _, tokens, acts, *_ in self.units:
                for a in [*tokens.values(), *acts.values()]:
                    f.write(memoryview(a).cast("B"))  # the array's own buffer: no copy, no encoding
            f.flush()
            os.fsync(f.fileno())
        dt = time.perf_counter() - t0
        path.unlink()
        return dt
