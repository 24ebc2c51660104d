"""Failures of the machine around a command, each in one line that says which thing failed
and how to check or fix it: object storage out of reach or without credentials, a
read-only output or cache, a damaged adapter, a hub model id without network."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage import fs
from tests.faults.conftest import cast
from tests.storage.s3server import free_port

ROOT = Path(__file__).resolve().parents[2]
NO_AWS = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE":
          "/dev/null", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}


@pytest.fixture
def aws(monkeypatch):
    """A clean S3 client environment (nothing but loopback is ever contacted)."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    for key, value in NO_AWS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(fs, "_FILESYSTEMS", {})
    monkeypatch.setattr(fs, "_CHECKED", set())
    return monkeypatch


def test_s3_endpoint_out_of_reach_says_endpoint(aws, capsys):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    aws.setenv("AWS_ENDPOINT_URL", endpoint)
    aws.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    aws.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    code, _, err = cast(capsys, "inspect", "s3://runs/x.zarr")
    assert code == 2 and f"cannot reach endpoint {endpoint}" in err and "--endpoint-url" in err
    assert "does not exist" not in err and err.count("\n") == 1


def test_s3_without_credentials_says_credentials(aws, capsys):
    aws.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    code, _, err = cast(capsys, "inspect", "s3://runs/x.zarr")
    assert code == 2 and "no credentials for bucket 'runs'" in err and "AWS_ACCESS_KEY_ID" in err
    assert "does not exist" not in err and err.count("\n") == 1


def test_s3_missing_bucket_still_says_so(bucket, capsys):
    missing = bucket + "-gone"
    code, _, err = cast(capsys, "inspect", f"{missing}/x.zarr")
    assert code == 2 and "does not exist" in err and "create it first" in err


@pytest.fixture
def read_only(monkeypatch, tmp_path) -> Path:
    """A directory on which creating anything fails as on a read-only filesystem (root
    ignores permission bits, so the failure is injected where the OS would raise it)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.mkdir

    def mkdir(path, mode=0o777, *, dir_fd=None):
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, mode) if dir_fd is None else real(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", mkdir)
    return ro


def test_read_only_out_names_the_path(read_only, corpus_dir, capsys):
    code, _, err = cast(capsys, "extract", "--model", "tiny-llama", "--out", read_only / "s.zarr", "--corpus",
                        corpus_dir, "--max-tokens", "200", "--max-chars", "160", "--workers", "0",
                        "--quiet")
    assert code == 2 and f"cannot write {read_only}" in err and "Read-only file system" in err
    assert "choose a writable --out" in err and err.count("\n") == 1


def test_read_only_cache_names_the_path(read_only, monkeypatch, capsys):
    monkeypatch.setenv("CAST_CACHE", str(read_only / "cache"))
    code, _, err = cast(capsys, "fetch-model", "tiny-llama")
    assert code == 2 and f"cannot write {read_only / 'cache'}" in err and "CAST_CACHE" in err
    assert err.count("\n") == 1


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A real (tiny) PEFT adapter for tiny-llama, to damage copies of."""
    from jobs.cli import main

    out = tmp_path_factory.mktemp("lora") / "add2"
    assert main(["lora", "train", "--model", "tiny-llama", "--task", "add2", "--steps", "2", "--batch-size", "2",
                 "--out", str(out), "--threads", "1"]) == 0
    return out


@pytest.mark.parametrize("broken,message", [
    ("adapter_config.json", "adapter_config.json is not valid JSON"),
    ("adapter_model.safetensors", "adapter_model.safetensors is not a readable safetensors file"),
])
def test_malformed_adapter_names_the_file(adapter, tmp_path, capsys, broken, message):
    import shutil

    d = tmp_path / "a"
    shutil.copytree(adapter, d)
    (d / broken).write_bytes(b"{ this is not what it claims" if broken.endswith(".json") else os.urandom(64))
    code, _, err = cast(capsys, "evaluate", "--model", "tiny-llama", "--adapter", d, "--task", "add2",
                        "--limit", "2", "--quiet")
    assert code == 2 and message in err and str(d / broken) in err and "Traceback" not in err


def test_malformed_adapter_in_the_bridge_names_the_file(adapter, tmp_path):
    import shutil

    from pipeline.assemble.bridge import BridgeError, read_lora

    d = tmp_path / "a"
    shutil.copytree(adapter, d)
    (d / "adapter_config.json").write_text("[1, 2")
    with pytest.raises(BridgeError, match="adapter_config.json is not a valid adapter config"):
        read_lora(d)
    (d / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (d / "adapter_model.safetensors").write_bytes(b"\xff" * 40)
    with pytest.raises(BridgeError, match="adapter_model.safetensors is not a readable safetensors file"):
        read_lora(d)


def run_cli(*argv, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


@pytest.mark.parametrize("env,why", [
    ({"HF_HUB_OFFLINE": "1"}, "is switched off here (HF_HUB_OFFLINE)"),
    ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:{port}"}, "cannot give it here"),
])
def test_hub_id_without_network_fails_at_once(tmp_path, corpus_dir, env, why):
    env = {k: v.format(port=free_port()) for k, v in env.items()}
    r = run_cli("extract", "--model", "no-org/no-such-model", "--out", tmp_path / "s.zarr", "--corpus", corpus_dir,
                "--workers", "0", "--quiet", env=env)
    assert r.returncode == 2, r.stderr
    assert why in r.stderr and "cast fetch-model" in r.stderr and "local Hugging Face model directory" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "s.zarr").exists()
