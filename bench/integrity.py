"""(f) of `cast bench`: what the store's integrity checks cost (docs/design.md#store-format).

Every chunk carries a crc32c of its compressed bytes: the write computes it once, every
read recomputes it. Timed on the store (a) made: the checksum over every byte the store
holds (files read into memory first, so the disk is not timed), the presence check
(one listing per unit), and a full checked read of every (layer, site) for scale.
"""
from __future__ import annotations

import time
from pathlib import Path

from bench.timing import median


def integrity_cost(store_path: Path, reps: int) -> dict:
    import google_crc32c

    import storage
    from storage.layout import UNITS

    files = [p for p in (Path(store_path) / UNITS).rglob("*") if p.is_file() and "/c/" in p.as_posix()]
    blobs = [p.read_bytes() for p in files]
    crc, listing, read = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        for b in blobs:
            google_crc32c.value(b)
        crc.append(time.perf_counter() - t0)
        store = storage.open_store(store_path)
        t0 = time.perf_counter()
        store.check_files()
        listing.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for layer in store.layers:
            for site in store.sites:
                store.array(layer, site).compute(scheduler="synchronous")
        read.append(time.perf_counter() - t0)
    return {"files": len(files), "bytes": sum(len(b) for b in blobs), "crc_s": median(crc),
            "listing_s": median(listing), "read_s": median(read)}
