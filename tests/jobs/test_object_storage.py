"""The pipeline where there is no shared disk: stores and artifacts on S3 (moto's server on
127.0.0.1) and a real two-node Ray cluster on this machine (`ray start --head` plus a second
`ray start --address` node with a custom resource of its own, both on loopback, token auth).

In order, sharing one cluster and one bucket: extraction with an actor on each node, a
worker killed mid-run and the stage re-run, bit-identical to a clean local run; verify and
dask reads from S3; head training submitted to the cluster as a job, reading and writing
S3; a LoRA trained, bridged and validated with everything on S3, ending in a report there;
resource requests no node can hold refused; and no credential in any file written.
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import storage
from jobs.cli import main
from storage import fs
from storage.check import verify
from tests.jobs.raycluster import BIN, RayHead, RayNode, clean_env
from tests.jobs.test_submit import assert_same_heads, assert_same_store

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ["--max-tokens", "600", "--max-chars", "160", "--unit-tokens", "48", "--sites", "resid,attn_in,q_proj.out",
            "--dtype", "float32", "--quiet"]
HEADS = ["--sites", "attn_in,q_proj.out", "--kinds", "mlp,ridge", "--hidden", "16", "--epochs", "1", "--quiet"]
OUTPUTS: list[str] = []  # everything the commands printed, scanned for credentials at the end


@pytest.fixture(scope="module")
def cluster(s3):
    """Head (1 CPU) and a second node (1 CPU, resource castnode2); both get the S3 endpoint
    and credentials in their environment, as pods get them from a Secret. Started now,
    awaited when first needed; stopped after the module, failures included."""
    head = RayHead(num_cpus=1, token=secrets.token_hex(16), env=s3.env)
    node = None
    try:
        head.wait_ready()
        node = RayNode(head, num_cpus=1, resources={"castnode2": 1})
        node.wait_joined()
        yield head
    finally:
        if node is not None:
            node.stop()
        head.stop()
        assert not head.leftovers(), "the test Ray cluster left processes behind"


@pytest.fixture(scope="module")
def where(s3, tmp_path_factory, corpus_dir):
    """The bucket for this module, and local reference outputs of every stage made here
    without Ray: what the runs on S3 and on the cluster must reproduce bit for bit."""
    from storage.fs import filesystem

    name = f"cast-cluster-{secrets.token_hex(4)}"
    filesystem("s3").mkdir(name)
    ref = tmp_path_factory.mktemp("reference")
    for role, model in (("src", "tiny-llama"), ("tgt", "tiny-gemma3")):
        assert main(["extract", "--model", model, "--out", str(ref / f"{role}.zarr"), "--corpus", str(corpus_dir),
                     "--workers", "0", *SETTINGS]) == 0
    return {"bucket": f"s3://{name}", "run": f"s3://{name}/run", "ref": ref, "corpus": str(corpus_dir)}


def cast_env(head: RayHead, s3) -> dict:
    """What a user's shell has: the cluster's token and the S3 settings, nothing else of Ray's."""
    return clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                     **s3.env)


def extract_argv(where: dict, head: RayHead) -> list[str]:
    return ["extract", "--model", "tiny-llama", "--out", f"{where['run']}/src.zarr", "--corpus", where["corpus"],
            "--workers", "2", "--cpus-per-worker", "1", "--address", f"127.0.0.1:{head.gcs_port}", *SETTINGS]


def slowed_extract(argv: list[str], env: dict) -> subprocess.Popen:
    """`cast extract` whose workers pause after each unit, so one can be killed mid-run. The
    pause is injected here: a subclass defined in __main__ travels to the actors by value."""
    code = textwrap.dedent(f"""
        import sys, time
        import pipeline.cache.extract as E
        class Slow(E.Extractor):
            def run(self, unit):
                res = super().run(unit)
                time.sleep(0.5)
                return res
        E.Extractor = Slow
        from jobs.cli import main
        sys.exit(main({argv!r}))
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_extract_on_both_nodes_killed_and_rerun_equals_a_clean_local_run(cluster, where, s3):
    env, argv = cast_env(cluster, s3), extract_argv(where, cluster)
    proc = slowed_extract(argv, env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    workers = {}
    rows = fs.as_path(f"{where['run']}/src.zarr/manifest")
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            workers = {m.group(1): (m.group(2), int(m.group(3))) for line in list(lines)
                       if (m := re.search(r"\[cast\] worker (\d) on node (\w+) \(127\.0\.0\.1\) pid (\d+)", line))}
            if len(workers) == 2 and any(rows.glob("u*.parquet")):
                break
            time.sleep(0.1)
        assert proc.poll() is None and len(workers) == 2, \
            f"the extraction ended, or never had two workers, before one could be killed:\n{''.join(lines)}"
        committed_before = len(list(rows.glob("u*.parquet")))
        os.kill(workers["1"][1], signal.SIGKILL)  # a worker process dies mid-run (a node lost, a spot reclaim)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # the test failed with the driver still running: stop it
            proc.kill()
            proc.wait(timeout=30)
    reader.join(timeout=30)  # the reader thread alone reads stderr, to its end
    out, err = proc.stdout.read(), "".join(lines)
    OUTPUTS.extend([out, err])
    print(err)
    # One actor on each node: two distinct node ids in the log, the two nodes of the cluster.
    nodes = {n["id"]: n for n in cluster.nodes()}
    assert {w[0] for w in workers.values()} == set(nodes) and len(nodes) == 2
    assert any("castnode2" in n["resources"] for n in nodes.values())
    assert proc.returncode == 1 and "its Ray worker died" in err and "run the same command again to resume" in err
    assert committed_before < len(storage.open_store(f"{where['run']}/src.zarr").meta["plan"])

    rerun = subprocess.run([str(BIN / "cast"), *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    OUTPUTS.extend([rerun.stdout, rerun.stderr])
    assert rerun.returncode == 0, rerun.stderr
    assert re.search(r"\((\d+) units already committed\)", rerun.stderr).group(1) != "0"

    # Bit-identical to the clean local run: every object but the manifest rows byte for
    # byte, the rows equal but for time and worker, every array and sha256 the same.
    remote, local = f"{where['run']}/src.zarr", where["ref"] / "src.zarr"
    got = {str(f.relative_to(fs.as_path(remote))): f.read_bytes() for f in fs.as_path(remote).rglob("*")}
    want = {str(f.relative_to(local)): f.read_bytes() for f in local.rglob("*") if f.is_file()}
    assert set(got) == set(want)
    assert [k for k in want if got[k] != want[k] and not k.startswith("manifest/")] == []
    assert_same_store(remote, local)


def test_verify_and_dask_read_the_store_on_s3(where, capsys):
    remote = f"{where['run']}/src.zarr"
    assert main(["verify", remote, "--quiet"]) == 0
    out = capsys.readouterr().out
    OUTPUTS.append(out)
    store = storage.open_store(remote, expect={"model": "tiny-llama"})
    assert f"{remote}: {len(store.units)}/{len(store.units)} units verified" in out
    ref = storage.open_store(where["ref"] / "src.zarr")
    x = store.array(2, "attn_in")
    assert x.npartitions == len(store.units)  # lazily, a block per unit, read from S3
    np.testing.assert_array_equal(x.compute(), ref.array(2, "attn_in").compute())
    np.testing.assert_array_equal(store.tokens()["segment_id"].compute(), ref.tokens()["segment_id"].compute())


def test_train_heads_submitted_to_the_cluster_reads_and_writes_s3(cluster, where, s3, tmp_path, capsys):
    run, ref = where["run"], where["ref"]
    # The rest of the inputs on S3 (in this process), and the local reference heads.
    assert main(["extract", "--model", "tiny-gemma3", "--out", f"{run}/tgt.zarr", "--corpus", where["corpus"],
                 "--workers", "0", *SETTINGS]) == 0
    for root in (run, str(ref)):
        stores = [f"{root}/src.zarr", f"{root}/tgt.zarr"]
        assert main(["align", *stores, "--out", f"{root}/align"]) == 0
        assert main(["layermap", *stores, "--align", f"{root}/align", "--out", f"{root}/layermap", "--n-pairs",
                     "256", "--quiet"]) == 0
    inputs = lambda root: ["--src-store", f"{root}/src.zarr", "--tgt-store", f"{root}/tgt.zarr",  # noqa: E731
                           "--align", f"{root}/align", "--layermap", f"{root}/layermap"]
    assert main(["train-heads", *inputs(ref), "--out", str(ref / "heads"), "--workers", "0", *HEADS]) == 0
    OUTPUTS.append(capsys.readouterr().out)

    # The job gets no credentials from here: the nodes have them, as pods from a Secret.
    token_file = tmp_path / "token"
    token_file.write_text(cluster.token)
    submit = subprocess.run(
        [str(BIN / "cast"), "submit", "train-heads", "--address", cluster.url, "--token-file", str(token_file),
         "--env", f"CAST_CACHE={os.environ['CAST_CACHE']}", "--", *inputs(run), "--out", f"{run}/heads",
         "--workers", "2", "--cpus-per-head", "1", *HEADS],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    OUTPUTS.extend([submit.stdout, submit.stderr])
    print(submit.stderr)
    assert submit.returncode == 0, f"{submit.stdout}\n{submit.stderr}"
    assert "SUCCEEDED" in submit.stderr and "Connected to Ray cluster" in submit.stdout
    on = set(re.findall(r"\[cast\] worker \d on node (\w+)", submit.stdout))
    assert on == {n["id"] for n in cluster.nodes()}  # head tasks on both nodes
    fs.copy_to_local(f"{run}/heads", tmp_path / "heads")
    assert_same_heads(tmp_path / "heads", ref / "heads")

    # A bucket that does not exist ends the stage at once, naming it; nothing committed is lost.
    assert main(["train-heads", *inputs(run), "--out", "s3://no-such-bucket-cast/heads", "--workers", "0",
                 *HEADS]) == 2
    err = capsys.readouterr().err
    OUTPUTS.append(err)
    assert "s3://no-such-bucket-cast/heads: bucket 'no-such-bucket-cast' does not exist" in err
    assert verify(f"{run}/src.zarr").ok and fs.as_path(f"{run}/heads/index.json").exists()


def test_a_lora_bridged_and_validated_on_s3_ends_in_a_report_there(where, capsys):
    run = where["run"]
    assert main(["lora", "train", "--model", "tiny-llama", "--task", "add2", "--targets", "q_proj", "--steps", "3",
                 "--out", f"{run}/lora-add2", "--quiet"]) == 0
    assert main(["validate", "--adapter", f"{run}/lora-add2", "--heads", f"{run}/heads", "--out", f"{run}/report",
                 "--limit", "4", "--n-boot", "50", "--offtask-sequences", "0", "--quiet"]) == 0
    OUTPUTS.extend(capsys.readouterr())
    report = fs.as_path(f"{run}/report")
    names = {p.name for p in report.iterdir()}
    assert {"report.json", "report.md", "report.png", "predictions", "bridged-mlp", "bridged-ridge",
            "retrained-target-lora", "weightspace-lora", "bridged-proxy", "answer_ll"} <= names
    assert "target + CAST (mlp)" in (report / "report.md").read_text()
    from pipeline.assemble.transfer import load_bridged

    assert load_bridged(f"{run}/report/bridged-mlp").info.name == "tiny-gemma3"  # loads from the bucket


def test_a_worker_larger_than_every_node_is_refused_naming_the_flag(cluster, where, s3):
    argv = extract_argv(where, cluster)
    argv[argv.index("--cpus-per-worker") + 1] = "2"  # the cluster has 2 CPUs, but 1 per node
    argv[argv.index("--out") + 1] = f"{where['run']}/other.zarr"
    proc = subprocess.run([str(BIN / "cast"), *argv], cwd=ROOT, env=cast_env(cluster, s3), capture_output=True,
                          text=True, timeout=300)
    OUTPUTS.extend([proc.stdout, proc.stderr])
    assert proc.returncode == 2, proc.stderr
    assert ("cast extract: error: --cpus-per-worker 2: each worker would need 2 CPU(s) and 0 GPU(s) on one node, "
            "but no node of the cluster has that much (127.0.0.1 1 CPU 0 GPU, 127.0.0.1 1 CPU 0 GPU)") in proc.stderr


def test_no_credential_in_any_file_written(cluster, where, s3, tmp_path_factory):
    """Every object in the bucket, every file the tests and the cluster wrote (logs of both
    nodes and of the jobs included) and everything the commands printed."""
    fs.copy_to_local(where["bucket"], tmp_path_factory.mktemp("bucket") / "all")
    roots = [tmp_path_factory.getbasetemp(), cluster.tmp]
    assert OUTPUTS and s3.leaks(roots, OUTPUTS) == []
    planted = tmp_path_factory.mktemp("planted") / "x.json"  # the scan does find one where it is
    planted.write_text(s3.secret)
    assert s3.leaks([planted.parent]) == [str(planted)]
