"""`cast submit STAGE --address URL [options] -- <flags of cast STAGE>`: run a stage as a Ray job."""
from __future__ import annotations

import argparse
import sys

from jobs.args import Command

DESCRIPTION = """\
Run one stage on a Ray cluster as a job: `python -m jobs.<stage> <stage flags>` is
submitted through the cluster's dashboard (JobSubmissionClient), its logs stream here, and
the exit status is the job's: 0 SUCCEEDED, 1 FAILED (its error is repeated at the end),
3 STOPPED, 2 for a problem before submission, 130 when you stop following (the job goes on).

The stage's flags come after `--` and are checked here before submitting. Paths in them
are read on the cluster: use a shared filesystem, or object-store URLs (s3://bucket/...)
whose credentials the cluster's nodes have. Inside the job the stage joins the
cluster (its Ray actors/tasks are scheduled there) instead of starting a local Ray.

Example:
  cast submit extract --address http://HEAD:8265 --env CAST_CACHE=/shared/cache -- \\
      --model gemma3-270m --out /shared/runs/target.zarr --workers 4 --gpus-per-worker 1
"""


def cmd_submit(ns) -> int:
    from jobs.submit import (EXIT_USAGE, JobRequest, SubmitError, connect, default_resources, load_runtime_env,
                             normalise_stage, parse_env, parse_memory, parse_stage_flags, run_job)

    if not ns.rest or ns.rest[0].startswith("-"):
        print("cast submit: error: name the STAGE first, e.g. cast submit extract --address http://HEAD:8265 "
              "-- --model tiny-llama --out /shared/s.zarr", file=sys.stderr)
        return EXIT_USAGE
    ns.stage, rest = ns.rest[0], ns.rest[1:]
    # Options may also come after STAGE: everything before `--` is ours, after it the stage's.
    split = rest.index("--") if "--" in rest else len(rest)
    ours, flags = rest[:split], rest[split + 1:]
    if ours:
        unknown = ns.options.parse_known_args(ours, namespace=ns)[1]
        if unknown:
            print(f"cast submit: error: {' '.join(unknown)}: the stage's flags go after `--`, e.g. "
                  f"cast submit {ns.stage} --address URL -- {' '.join(unknown)}", file=sys.stderr)
            return EXIT_USAGE
    try:
        stage = normalise_stage(ns.stage)
        stage_ns = parse_stage_flags(stage, flags)
        defaults = default_resources(stage_ns)
        req = JobRequest(
            stage=stage, flags=flags, python=ns.python, working_dir=ns.working_dir,
            runtime_env=load_runtime_env(ns.runtime_env), env=parse_env(ns.env),
            cpus=ns.cpus if ns.cpus is not None else defaults["cpus"],
            gpus=ns.gpus if ns.gpus is not None else defaults["gpus"],
            memory=parse_memory(ns.memory), submission_id=ns.submission_id)
        client = connect(ns.address, ns.token_file)
        return run_job(client, req, wait=not ns.no_wait)
    except SubmitError as e:
        print(f"cast submit: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _submit_args(s: argparse.ArgumentParser) -> None:
    # One REMAINDER positional for STAGE and what follows: argparse would otherwise drop a
    # `--` right after STAGE, and the stage's flags could no longer be told from ours.
    s.add_argument("rest", nargs=argparse.REMAINDER, metavar="STAGE [OPTIONS] -- FLAGS",
                   help="the stage to run (extract, align, layermap, train-heads, validate, run: any `cast` "
                   "subcommand with a jobs/<stage>.py entrypoint), then `--` and the flags of `cast STAGE`")
    add_options(s)
    s.set_defaults(options=add_options(argparse.ArgumentParser(add_help=False)))


def add_options(s: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `cast submit` (also accepted between STAGE and `--`)."""
    g = s.add_argument_group("cluster")
    g.add_argument("--address", help="the cluster's dashboard URL, e.g. http://HEAD:8265 "
                   "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    g.add_argument("--token-file", metavar="FILE",
                   help="file holding the cluster's auth token (`ray get-auth-token` on the head); default: "
                   "Ray's own settings (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)")
    g.add_argument("--working-dir", metavar="DIR",
                   help="upload DIR (e.g. this checkout) and run the job from it; needed when the cluster's "
                   "environment lacks this project (default: none, use the installed package)")
    g.add_argument("--runtime-env", metavar="FILE",
                   help="runtime_env YAML/JSON (see infra/runtime_env.yaml); --working-dir and --env override it")
    g.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="environment variable for the job (repeatable); KEY alone forwards this shell's value, "
                   "e.g. --env CAST_CACHE")
    g.add_argument("--python", default="python",
                   help="interpreter on the cluster that runs `-m jobs.<stage>` (default: python)")
    g.add_argument("--submission-id", help="job id to use (default: Ray generates one)")
    g.add_argument("--no-wait", action="store_true", help="print the job id and return without following the job")
    g = s.add_argument_group("resources of the job's entrypoint process (Ray actors/tasks of the stage ask for "
                             "their own, e.g. extract --workers N --gpus-per-worker G)")
    g.add_argument("--cpus", type=float, help="CPUs (default: 0 when the stage fans out with --workers > 0, else 1)")
    g.add_argument("--gpus", type=float,
                   help="GPUs (default: 0; for extract --workers 0, its --gpus-per-worker)")
    g.add_argument("--memory", metavar="BYTES", help="memory to reserve, bytes or 8G/512M (default: none)")
    return s


SUBMIT = Command("run a stage on a Ray cluster as a job; stream its logs; exit with its status", cmd_submit,
                 description=DESCRIPTION, preformatted=True, add_args=_submit_args)
