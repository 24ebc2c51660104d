"""Committing store units behind the forward pass: a writer thread fed through a bounded
queue (docs/design.md#commit-protocol, "Extraction's writes").

A unit's write (chunk files, crc32c, the rename and the manifest row) costs the same
whatever computed the activations; on a GPU it would otherwise be the whole cost of
extraction. So the extraction worker forwards unit i+1 while unit i is written here.
crc32c, file I/O and torch's kernels all release the GIL, so the two overlap.

What holds:
- memory is bounded: at most `depth` units wait or are being written, plus the one the
  worker is filling; `submit` blocks until there is room;
- nothing changes in the store's contract: each unit is still committed by `write` alone
  (its directory renamed into place, then its manifest row), so a kill leaves at most
  uncommitted units, which a re-run redoes;
- a failed write is never silent: it is re-raised, naming the unit, by the next `submit`
  or by `flush`, and a run reports success only after `flush` returned.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class UnitWriteError(RuntimeError):
    """A unit's write failed on the writer thread; the unit is not committed."""


class WriteBehind:
    """Runs `write(*args)` for each submitted unit on one background thread, in order.

    depth: writes that may be pending at once (queued or running); 0 writes inline, in
    the caller's thread (the serial path, kept for comparison and debugging).
    """

    def __init__(self, depth: int = 1):
        if depth < 0:
            raise ValueError(f"write depth must be >= 0, got {depth}")
        self.depth = depth
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[int, Future]] = deque()

    def submit(self, unit: int, write: Callable, *args) -> None:
        """Hand unit `unit` to the writer; blocks while `depth` writes are pending. Raises
        UnitWriteError for an earlier unit whose write failed (this one is then not taken)."""
        if self.depth == 0:
            self._wait(unit, _done(write, *args))
            return
        while len(self._pending) >= self.depth:
            self._next()
        if self._pool is None:
            # One thread: units are written in order, and one write's own work is what
            # overlaps the forward pass (a second writer would compete with it for cores).
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cast-unit-writer")
        self._pending.append((unit, self._pool.submit(write, *args)))

    def flush(self) -> None:
        """Wait for every pending write. If any failed, the others still finish (a unit
        whose write succeeded is committed and kept), then the first failure is raised."""
        first: BaseException | None = None
        while self._pending:
            try:
                self._next()
            except UnitWriteError as err:
                first = first or err
        if first is not None:
            raise first

    def close(self) -> None:
        """Flush, then stop the thread."""
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    @property
    def pending(self) -> list[int]:
        """Units handed over and not yet known to be committed."""
        return [unit for unit, _ in self._pending]

    def _next(self) -> None:
        """Wait for the oldest pending write; it stays listed in `pending` until it is done."""
        try:
            self._wait(*self._pending[0])
        finally:
            self._pending.popleft()

    @staticmethod
    def _wait(unit: int, fut: Future) -> None:
        try:
            fut.result()
        except Exception as err:  # noqa: BLE001 - re-raised naming the unit
            failed = UnitWriteError(f"unit {unit}: writing it to the store failed ({type(err).__name__}: {err}); "
                                    f"it was not committed, and a re-run redoes it")
            failed.error = err  # kept apart from __cause__, which retry layers may clear
            raise failed from err


def _done(fn: Callable, *args) -> Future:
    """fn(*args) run here, as a completed Future (the inline path shares _wait's errors)."""
    fut: Future = Future()
    try:
        fut.set_result(fn(*args))
    except Exception as err:  # noqa: BLE001 - handed to the Future
        fut.set_exception(err)
    return fut
