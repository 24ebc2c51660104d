"""Shared fixtures: a persistent test cache (tiny presets, corpora), a small corpus
written here, and one local Ray on 127.0.0.1 for the whole session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny presets and the built-in corpus are cached across runs, apart from the user's cache.
os.environ.setdefault("CAST_CACHE", str(Path.home() / ".cache" / "cast-test"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SENTENCES = [
    "The river ran quickly past the old stone house in the morning light.",
    "Seven green windows opened onto a garden where forty people waited.",
    "She wrote a long letter to the city market about the price of water.",
    "After many years the number of small boats on the lake had doubled.",
    "They jumped between the rocks, laughing, while the evening grew cold.",
    "A hundred birds crossed the valley; nobody could count them all.",
    "Reading maps is easier when the roads are drawn in bright colours.",
    "The committee adopted the resolution after a short debate on Tuesday.",
    "His brother kept bees, sold honey, and repaired clocks in winter.",
    "Under the bridge, the water was dark, quiet and surprisingly warm.",
]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Three documents of our own sentences (no downloaded text)."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        lines = [SENTENCES[(i * 3 + j) % len(SENTENCES)] for j in range(12)]
        (d / f"doc{i}.txt").write_text(" ".join(lines) + "\n")
    return d


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 for the session (started on first use, stopped after),
    with this process's environment pointing at it as any S3 client's would."""
    from storage import fs
    from tests.storage.s3server import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto"))
    env = pytest.MonkeyPatch()
    try:
        for key, value in server.env.items():
            env.setenv(key, value)
        fs._FILESYSTEMS.clear()
        fs._CHECKED.clear()
        yield server
    finally:
        env.undo()
        fs._FILESYSTEMS.clear()
        fs._CHECKED.clear()
        server.stop()


@pytest.fixture
def bucket(s3, request) -> str:
    """A new empty bucket for one test: its s3:// URL."""
    import re
    import secrets

    from storage.fs import filesystem

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + secrets.token_hex(3)
    filesystem("s3").mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, bound to loopback; stages reuse it."""
    from runtime.cluster import start_local_ray

    ray = start_local_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()
