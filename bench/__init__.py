"""Benchmarks of the pipeline against its naive alternatives (`cast bench`, DESIGN §9)."""
