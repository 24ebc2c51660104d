"""The shared body of the Ray job entrypoints `python -m jobs.<stage> [flags]`.

Each entrypoint takes exactly the flags of `cast <stage>` (same config dataclass, same
parser, same output) and differs in one way: a stage that can use Ray joins the cluster
the job runs on instead of starting a private local Ray. Inside a Ray job the job
supervisor sets RAY_ADDRESS; elsewhere the entrypoint joins `auto` (a cluster started on
this machine with `ray start`) or whatever --address says.

A new stage entrypoint is one module, e.g. jobs/validate.py:

    from jobs.entrypoint import stage_main
    if __name__ == "__main__":
        raise SystemExit(stage_main("validate"))

and `cast submit validate` finds it (jobs.submit looks for jobs/<stage>.py).
"""
from __future__ import annotations

import os
import sys

from jobs.stages import build_parser, run_command


def module_name(command: str) -> str:
    """`cast` subcommand -> entrypoint module: train-heads -> jobs.train_heads."""
    return "jobs." + command.replace("-", "_")


def cluster_address() -> str:
    """The cluster a job entrypoint joins: RAY_ADDRESS (set by Ray for every job), else auto."""
    return os.environ.get("RAY_ADDRESS") or "auto"


def with_cluster_address(command: str, argv: list[str]) -> list[str]:
    """argv plus `--address <cluster>` when the stage takes --address and none was given
    (nor an abbreviation argparse would accept, e.g. --addr)."""
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices.get(command)
    takes_address = sub is not None and any("--address" in a.option_strings for a in sub._actions)
    given = any(len(arg.split("=")[0]) > 3 and "--address".startswith(arg.split("=")[0]) for arg in argv)
    if takes_address and not given:
        return [*argv, "--address", cluster_address()]
    return argv


def stage_main(command: str, argv: list[str] | None = None) -> int:
    """Run `cast <command> argv` as a job entrypoint; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = with_cluster_address(command, argv)
    where = f" on Ray at {argv[argv.index('--address') + 1]}" if "--address" in argv else ""
    print(f"[cast] job entrypoint {module_name(command)}: cast {command}{where}", file=sys.stderr, flush=True)
    try:
        return run_command([command, *argv])
    except ConnectionError as e:  # ray.init found no cluster to join
        print(f"python -m {module_name(command)}: error: no Ray cluster to join ({e}). Submit it as a job "
              f"(`cast submit {command} --address http://HEAD:8265 -- ...` or `ray job submit -- python -m "
              f"{module_name(command)} ...`), pass --address HOST:PORT of a running cluster, or run "
              f"`cast {command}` to use a private local Ray.", file=sys.stderr)
        return 2
