"""Stages submitted to a real Ray head with `cast submit` make exactly what they make locally;
a failed job fails `cast submit` with the job's own error; bad submissions are refused early."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import numpy as np
import pytest

import storage
from jobs.cli import main
from jobs.entrypoint import stage_main, with_cluster_address
from tests.jobs.raycluster import BIN, RayHead, clean_env

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]
EXTRACT = ["--max-tokens", "300", "--max-chars", "160", "--unit-tokens", "128", "--sites", "resid,attn_in",
           "--dtype", "float32", "--quiet"]
MODELS = {"src": "tiny-llama", "tgt": "tiny-gemma3"}
HEADS = ["--sites", "attn_in", "--kinds", "ridge", "--quiet"]
RUN_FIELDS = {"seconds", "worker", "committed_at"}  # per-run facts, not results


@pytest.fixture(scope="module")
def head():
    """A Ray head on 127.0.0.1 with token authentication (Ray's default), started now and
    awaited only when a test first needs it, so the local reference runs overlap its start."""
    h = RayHead(num_cpus=2, token=secrets.token_hex(16))
    try:
        yield h
    finally:
        h.stop()
        assert not h.leftovers(), "the test Ray head left processes behind"


def submit(head: RayHead, stage: str, *flags: str, options: tuple[str, ...] = (), token: bool = True,
           wait: bool = True):
    """`cast submit` in a subprocess, as a user runs it (no Ray settings in its environment)."""
    token_file = head.tmp / "token"
    token_file.write_text(head.token)
    cmd = [str(BIN / "cast"), "submit", stage, "--address", head.wait_ready(),
           *(["--token-file", str(token_file)] if token else []),
           "--env", f"CAST_CACHE={os.environ['CAST_CACHE']}", "--env", "TOKENIZERS_PARALLELISM=false",
           *options, "--", *flags]
    proc = subprocess.Popen(cmd, env=clean_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return proc.communicate(timeout=300) + (proc.returncode,) if wait else proc


def finish(proc) -> tuple[str, str, int]:
    out, err = proc.communicate(timeout=300)
    return out, err, proc.returncode


@pytest.fixture(scope="module")
def local(tmp_path_factory, corpus_dir):
    """Every stage run here, without Ray: the reference the submitted jobs must reproduce.
    align and layermap run through their job entrypoints (in this process: no cluster)."""
    from heads.run import TrainHeadsConfig, run_train_heads
    from pipeline.cache.extract import ExtractConfig, run_extract

    d = tmp_path_factory.mktemp("local")
    for role, model in MODELS.items():  # the settings of EXTRACT
        run_extract(ExtractConfig(model=model, out=str(d / f"{role}.zarr"), corpus=str(corpus_dir), workers=0,
                                  max_tokens=300, max_chars=160, unit_tokens=128, sites="resid,attn_in",
                                  dtype="float32"), progress=False)
    assert stage_main("align", [str(d / "src.zarr"), str(d / "tgt.zarr"), "--out", str(d / "align")]) == 0
    assert stage_main("layermap", [str(d / "src.zarr"), str(d / "tgt.zarr"), "--align", str(d / "align"),
                                   "--out", str(d / "layermap"), "--n-pairs", "256", "--quiet"]) == 0
    run_train_heads(TrainHeadsConfig(src_store=str(d / "src.zarr"), tgt_store=str(d / "tgt.zarr"),
                                     align=str(d / "align"), layermap=str(d / "layermap"), out=str(d / "heads"),
                                     sites="attn_in", kinds="ridge", workers=0), progress=False)
    return d


def assert_same_store(got: Path, want: Path) -> None:
    a, b = storage.open_store(got), storage.open_store(want)
    assert a.meta == b.meta
    strip = [{k: v for k, v in r.items() if k not in RUN_FIELDS} for r in a.manifest]
    assert strip == [{k: v for k, v in r.items() if k not in RUN_FIELDS} for r in b.manifest]  # incl. sha256s
    for field, values in a.tokens().items():
        np.testing.assert_array_equal(values.compute(), b.tokens()[field].compute(), err_msg=field)
    for layer in a.layers:
        for site in a.sites:
            np.testing.assert_array_equal(a.raw_array(layer, site).compute(), b.raw_array(layer, site).compute(),
                                          err_msg=f"{got} layer {layer} {site}")


def assert_same_heads(got: Path, want: Path) -> None:
    from safetensors.numpy import load_file

    files = sorted(p.relative_to(want) for p in want.rglob("*") if p.suffix in (".safetensors", ".json"))
    assert [p for p in files if p.suffix == ".safetensors"], f"no heads in {want}"
    assert files == sorted(p.relative_to(got) for p in got.rglob("*") if p.suffix in (".safetensors", ".json"))
    for rel in files:
        if rel.suffix == ".safetensors":
            x, y = load_file(got / rel), load_file(want / rel)
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{rel} {k}")
        elif rel.name != "index.json":
            x, y = json.loads((got / rel).read_text()), json.loads((want / rel).read_text())
            for meta in (x, y):
                meta.pop("seconds", None)
                meta.get("metrics", {}).pop("seconds", None)
            assert x.keys() == y.keys(), rel
            assert json.dumps(x.get("spec"), sort_keys=True) == json.dumps(y.get("spec"), sort_keys=True), rel
    index = json.loads((got / "index.json").read_text())
    ref = json.loads((want / "index.json").read_text())
    for side in ("source", "target"):  # the stores' identities match; only their paths differ
        assert {k: v for k, v in index["inputs"][side].items() if k != "path"} == \
            {k: v for k, v in ref["inputs"][side].items() if k != "path"}
    assert index["options"] == ref["options"]
    for h, r in zip(index["heads"], ref["heads"]):
        assert h["spec"] == r["spec"]
        assert h["metrics"]["heldout"]["r2"] == r["metrics"]["heldout"]["r2"]


@pytest.fixture(scope="module")
def failing_job(head, tmp_path_factory):
    """An extraction from a corpus that does not exist, submitted as soon as the head is up
    so that it runs alongside the other jobs (this machine is small)."""
    d = tmp_path_factory.mktemp("failing")
    proc = submit(head, "extract", "--model", "tiny-llama", "--out", str(d / "s.zarr"),
                  "--corpus", str(d / "no-such-corpus"), "--workers", "0", "--quiet", wait=False)
    yield d, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_submitted_extraction_and_head_training_equal_local_runs(head, local, failing_job, tmp_path, corpus_dir):
    flags = {role: ["--model", model, "--out", str(tmp_path / f"{role}.zarr"), "--corpus", str(corpus_dir), *EXTRACT]
             for role, model in MODELS.items()}
    # Both extractions at once: one fans out to a Ray actor on the cluster, one runs in the
    # job's own process (the entrypoint then reserves a CPU).
    jobs = [submit(head, "extract", *flags["src"], "--workers", "1", wait=False),
            submit(head, "extract", *flags["tgt"], "--workers", "0", wait=False)]
    for proc, joins in zip(jobs, (True, False)):
        out, err, code = finish(proc)
        print(err)  # cast submit's own lines: job id, entrypoint, outcome and time
        assert code == 0, f"cast submit failed ({code}):\n{out}\n{err}"
        assert "SUCCEEDED" in err and '"extracted_tokens"' in out  # the job's output streamed here
        assert ("Connected to Ray cluster" in out) is joins and "started a local Ray" not in out
    for role in MODELS:
        assert_same_store(tmp_path / f"{role}.zarr", local / f"{role}.zarr")

    # Head training as Ray tasks inside the job, from the uploaded checkout (--working-dir).
    out, err, code = submit(head, "train-heads", "--src-store", str(tmp_path / "src.zarr"),
                            "--tgt-store", str(tmp_path / "tgt.zarr"), "--align", str(local / "align"),
                            "--layermap", str(local / "layermap"), "--out", str(tmp_path / "heads"),
                            "--workers", "1", *HEADS, options=("--working-dir", str(ROOT)))
    print(err)
    assert code == 0, f"cast submit failed ({code}):\n{out}\n{err}"
    assert "Connected to Ray cluster" in out and "started a local Ray" not in out  # it joined the cluster
    assert_same_heads(tmp_path / "heads", local / "heads")


def test_failed_job_fails_cast_submit_with_its_error(failing_job):
    d, proc = failing_job
    out, err, code = finish(proc)
    assert code == 1, (out, err)
    # The job's own message, not just its status: the stage's error names the missing corpus.
    assert "FAILED" in err and "the job's error: cast extract: error:" in err and str(d / "no-such-corpus") in err
    assert not (d / "s.zarr").exists()


def test_cluster_with_token_auth_refuses_a_submission_without_token(head, capsys, monkeypatch):
    for key in [k for k in os.environ if k.startswith("RAY_")]:
        monkeypatch.delenv(key)
    assert main(["submit", "align", "--address", head.wait_ready(), "--", "a", "b", "--out", "c"]) == 2
    err = capsys.readouterr().err
    assert "the cluster refused us" in err and "--token-file" in err


@pytest.mark.parametrize("argv,message", [
    (["submit"], "name the STAGE first"),
    (["submit", "no-such-stage", "--", "x"], "STAGE 'no-such-stage' has no job entrypoint; choose one of align, "
                                              "distill, extract, layermap, lora, readout, run, train-heads, validate"),
    (["submit", "extract", "--address", "http://127.0.0.1:9", "--model", "m"], "the stage's flags go after `--`"),
    (["submit", "extract", "--address", "http://127.0.0.1:9", "--", "--model", "m"],
     "not valid for `cast extract`"),
    (["submit", "extract", "--", "--model", "m", "--out", "o"], "--address is required"),
    (["submit", "extract", "--address", "http://127.0.0.1:9", "--memory", "lots", "--", "--model", "m", "--out", "o"],
     "--memory 'lots': give bytes or a size like 8G"),
    (["submit", "extract", "--address", "http://127.0.0.1:9", "--env", "CAST_NO_SUCH_VAR", "--", "--model", "m",
      "--out", "o"], "--env CAST_NO_SUCH_VAR: CAST_NO_SUCH_VAR is not set in this shell"),
    (["submit", "align", "--address", "http://127.0.0.1:9", "--", "a", "b", "--out", "c"],
     "--address http://127.0.0.1:9: cannot reach a Ray dashboard there"),
])
def test_bad_submissions_are_refused_before_reaching_a_cluster(monkeypatch, capsys, argv, message):
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_resource_defaults_follow_the_stage_flags():
    from jobs.cli import build_parser
    from jobs.submit import default_resources, parse_memory

    def res(*argv):
        return default_resources(build_parser().parse_args(list(argv)))

    ex = ("extract", "--model", "m", "--out", "o")
    assert res(*ex, "--workers", "4", "--gpus-per-worker", "1") == {"cpus": None, "gpus": None}  # actors ask
    assert res(*ex, "--workers", "0", "--gpus-per-worker", "1") == {"cpus": 1, "gpus": 1.0}  # in-process
    assert res(*ex, "--workers", "0") == {"cpus": 1, "gpus": None}
    assert res("align", "a", "b", "--out", "c") == {"cpus": 1, "gpus": None}
    val = ("validate", "--adapter", "a", "--heads", "h", "--out", "o")
    assert res(*val) == {"cpus": 1, "gpus": None} and res(*val, "--device", "cuda") == {"cpus": 1, "gpus": 1}
    assert res("run") == {"cpus": None, "gpus": None}  # extraction actors and head tasks reserve their own
    assert parse_memory("8G") == 8 * 2**30 and parse_memory("512Mi") == 512 * 2**20 and parse_memory("100") == 100


def test_entrypoints_join_the_jobs_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    ex = ["--model", "m", "--out", "o"]
    assert with_cluster_address("extract", ex) == [*ex, "--address", "10.1.2.3:6379"]
    assert with_cluster_address("extract", [*ex, "--address", "h:1"]) == [*ex, "--address", "h:1"]
    assert with_cluster_address("extract", [*ex, "--addr=h:1"]) == [*ex, "--addr=h:1"]
    assert with_cluster_address("train-heads", ["--out", "o"])[-2:] == ["--address", "10.1.2.3:6379"]
    assert with_cluster_address("align", ["a", "b", "--out", "c"]) == ["a", "b", "--out", "c"]  # no Ray there
    monkeypatch.delenv("RAY_ADDRESS")
    assert with_cluster_address("extract", ex)[-1] == "auto"
