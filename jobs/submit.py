"""Submitting a stage to a Ray cluster as a job and following it to the end.

`cast submit STAGE --address http://HEAD:8265 -- <flags of cast STAGE>` runs
`python -m jobs.<stage> <flags>` on the cluster through Ray's JobSubmissionClient,
streams the job's logs to stdout and returns the job's outcome as an exit status.

The job's python must import this project: either the cluster's image/environment has it
installed (infra/Dockerfile), or `--working-dir .` uploads the checkout and the job runs
from it. Paths in the stage flags are read on the cluster: use shared-filesystem paths,
object-store URLs (s3://bucket/prefix, credentials on the nodes), or absolute paths on a
one-machine cluster.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

from jobs.entrypoint import module_name
from jobs.stages import STAGES, build_parser

EXIT_SUCCEEDED, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_DETACHED = 0, 1, 2, 3, 130


class SubmitError(Exception):
    """A problem found before or while talking to the cluster; the message says what to do."""


def stages() -> list[str]:
    """`cast` subcommands that have a job entrypoint module jobs/<stage>.py."""
    return sorted(c for c in STAGES if importlib.util.find_spec(module_name(c)) is not None)


def normalise_stage(stage: str) -> str:
    """train_heads and train-heads both name the `cast train-heads` stage."""
    known = stages()
    name = stage.replace("_", "-")
    if name not in known:
        raise SubmitError(f"STAGE {stage!r} has no job entrypoint; choose one of {', '.join(known)}")
    return name


def parse_stage_flags(stage: str, flags: list[str]):
    """Check the stage's flags here, with the stage's own parser, before anything reaches
    the cluster. argparse prints what is wrong; we turn its exit into a SubmitError."""
    try:
        return build_parser().parse_args([stage, *flags])
    except SystemExit as e:
        if e.code:
            raise SubmitError(f"the flags after `--` are not valid for `cast {stage}` (see the message above); "
                              f"`cast {stage} --help` lists them") from None
        raise


def default_resources(ns) -> dict:
    """What the job's entrypoint process reserves when --cpus/--gpus are not given.

    A stage that fans out to Ray actors/tasks (--workers > 0: extract, train-heads, run)
    reserves its CPUs and GPUs there (extraction actors ask for --gpus-per-worker GPUs
    each), so its driver reserves nothing and stays on the head node. A stage that runs in
    its own process (--workers 0, or no --workers flag: align, layermap, validate) reserves
    one CPU, and a GPU when it runs on one (extract --workers 0 --gpus-per-worker G, or
    --device cuda).
    """
    workers = getattr(ns, "workers", None)
    if workers:
        return {"cpus": None, "gpus": None}
    gpus = getattr(ns, "gpus_per_worker", 0.0) if workers == 0 else 0.0
    if str(getattr(ns, "device", None) or "").startswith("cuda"):
        gpus = max(gpus, 1)
    return {"cpus": 1, "gpus": gpus or None}


def parse_memory(text: str | None) -> int | None:
    """Bytes, or a number with K/M/G/T (powers of 1024): 8G, 512M."""
    if text is None:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise SubmitError(f"--memory {text!r}: give bytes or a size like 8G, 512M") from None


def load_runtime_env(path: str | None) -> dict:
    """A runtime_env from a YAML or JSON file (infra/runtime_env.yaml is an example)."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SubmitError(f"--runtime-env {path}: cannot read it ({e.strerror})") from None
    try:
        import yaml

        env = yaml.safe_load(text)
    except ImportError:
        env = json.loads(text)
    except Exception as e:  # noqa: BLE001 - yaml's errors carry the line and column
        raise SubmitError(f"--runtime-env {path}: not valid YAML/JSON: {e}") from None
    if not isinstance(env, dict):
        raise SubmitError(f"--runtime-env {path}: expected a mapping (working_dir, env_vars, pip, ...)")
    return env


def parse_env(items: list[str]) -> dict[str, str]:
    """--env KEY=VALUE sets KEY; --env KEY forwards this shell's value of KEY."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not key:
            raise SubmitError(f"--env {item!r}: use KEY=VALUE, or KEY to forward this shell's value")
        if not eq:
            if key not in os.environ:
                raise SubmitError(f"--env {key}: {key} is not set in this shell; use {key}=VALUE")
            value = os.environ[key]
        out[key] = value
    return out


@dataclass
class JobRequest:
    stage: str
    flags: list[str]
    python: str = "python"
    working_dir: str | None = None
    runtime_env: dict = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cpus: float | None = None
    gpus: float | None = None
    memory: int | None = None
    submission_id: str | None = None

    def entrypoint(self) -> str:
        return shlex.join([self.python, "-m", module_name(self.stage), *self.flags])

    def full_runtime_env(self) -> dict:
        env = dict(self.runtime_env)
        if self.working_dir:
            env["working_dir"] = self.working_dir
            env["excludes"] = sorted(set(env.get("excludes", [])) | {".git", "runs", "__pycache__"})
        if self.env:
            env["env_vars"] = {**env.get("env_vars", {}), **self.env}
        return env


def connect(address: str | None, token_file: str | None = None):
    """A JobSubmissionClient for the cluster's dashboard, with a clear error if unreachable."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("--address is required: the cluster's dashboard URL, e.g. --address http://HEAD:8265 "
                          "(or set RAY_ADDRESS)")
    headers = None
    if token_file:
        try:
            token = open(token_file, encoding="utf-8").read().strip()
        except OSError as e:
            raise SubmitError(f"--token-file {token_file}: cannot read it ({e.strerror})") from None
        headers = {"Authorization": f"Bearer {token}"}
    from ray.exceptions import AuthenticationError

    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        raise SubmitError(_auth_hint(address, e)) from None
    except ConnectionError as e:
        raise SubmitError(f"--address {address}: cannot reach a Ray dashboard there ({e}). Check the URL "
                          "(http://HEAD:8265 by default), that the cluster is up (`ray status` on the head) "
                          "and that its dashboard is reachable from here") from None
    except RuntimeError as e:
        raise SubmitError(_auth_hint(address, e)) from None


def _auth_hint(address: str, e: Exception) -> str:
    text = str(getattr(e, "message", e))  # AuthenticationError's str() adds a page of advice
    if "uthentication" in text or "401" in text or "403" in text:
        return (f"--address {address}: the cluster refused us: {text.splitlines()[0]}. It uses token "
                "authentication: pass --token-file FILE holding its token (`ray get-auth-token` on the head), "
                "or set RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
    return f"--address {address}: the cluster refused the job: {text}"


def submit(client, req: JobRequest) -> str:
    kwargs = dict(entrypoint=req.entrypoint(), runtime_env=req.full_runtime_env() or None,
                  metadata={"cast_stage": req.stage}, submission_id=req.submission_id)
    for key, value in (("entrypoint_num_cpus", req.cpus), ("entrypoint_num_gpus", req.gpus),
                       ("entrypoint_memory", req.memory)):
        if value:
            kwargs[key] = value
    from ray.exceptions import AuthenticationError

    try:
        return client.submit_job(**kwargs)
    except (RuntimeError, ValueError, AuthenticationError) as e:
        raise SubmitError(_auth_hint(client.get_address(), e)) from None


def follow(client, job_id: str, out=None, poll_s: float = 0.5) -> tuple[str, list[str]]:
    """Stream the job's logs to `out` until it ends; (final status, last log lines)."""
    from ray.job_submission import JobStatus

    out = out or sys.stdout
    tail: list[str] = []
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed ..."

    async def stream():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            tail.extend(chunk.splitlines())
            del tail[:-200]

    try:
        asyncio.run(stream())
    except RuntimeError as e:  # the log stream closed early: fall back to polling the status
        print(f"cast submit: log stream of {job_id} ended early ({e}); waiting for the job's status",
              file=sys.stderr)
    status = client.get_job_status(job_id)
    while not JobStatus(status).is_terminal():
        time.sleep(poll_s)
        status = client.get_job_status(job_id)
    return str(JobStatus(status).value), tail


def last_error(tail: list[str], message: str) -> str | None:
    """The stage's own error line (`cast extract: error: ...`, a traceback's last line)."""
    for line in reversed([*message.splitlines(), *tail]):
        s = line.strip()
        if s and ("error:" in s.lower() or s.split(":")[0].endswith(("Error", "Exception"))):
            return s
    return None


def run_job(client, req: JobRequest, wait: bool = True, out=None) -> int:
    """Submit, follow, and map the job's final status to an exit status."""
    t0 = time.perf_counter()
    job_id = submit(client, req)
    res = {k: v for k, v in (("cpus", req.cpus), ("gpus", req.gpus), ("memory", req.memory)) if v}
    print(f"cast submit: job {job_id} ({req.stage}) submitted: {req.entrypoint()}"
          f"{'  resources ' + json.dumps(res) if res else ''}", file=sys.stderr, flush=True)
    if not wait:
        print(job_id)
        return EXIT_SUCCEEDED
    try:
        status, tail = follow(client, job_id, out=out)
    except KeyboardInterrupt:
        print(f"\ncast submit: stopped following; job {job_id} keeps running. Follow it with "
              f"`ray job logs -f {job_id}`, stop it with `ray job stop {job_id}` (same --address)",
              file=sys.stderr)
        return EXIT_DETACHED
    seconds = time.perf_counter() - t0
    if status == "SUCCEEDED":
        print(f"cast submit: job {job_id} SUCCEEDED in {seconds:.1f} s", file=sys.stderr)
        return EXIT_SUCCEEDED
    info = client.get_job_info(job_id)
    message = (info.message or "").strip()
    headline = message.splitlines()[0].split(", last available logs")[0] if message else "no message from Ray"
    print(f"cast submit: job {job_id} {status} after {seconds:.1f} s: {headline}", file=sys.stderr)
    err = last_error(tail, message)
    if err:
        print(f"cast submit: the job's error: {err}", file=sys.stderr)
    return EXIT_STOPPED if status == "STOPPED" else EXIT_FAILED
