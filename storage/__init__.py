"""Activation stores: Zarr v3 units, Parquet manifest, dask readers, integrity checks."""
from storage.layout import StoreError
from storage.reader import ActivationStore, open_store

__all__ = ["ActivationStore", "StoreError", "open_store"]
