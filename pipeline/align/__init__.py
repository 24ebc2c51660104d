"""Alignment stage: pair the two stores' tokens (pairs.py) and map layers (layermap.py)."""
