"""`cast`: every pipeline stage (jobs/stages.py), plus `cast submit` (a stage as a Ray job
on a cluster) and `cast bench` (the pipeline against its naive alternatives)."""
from __future__ import annotations

import argparse
import sys

from jobs import cli_bench, cli_submit, stages
from jobs.args import Command

COMMANDS: dict[str, Command] = {**stages.STAGES, "submit": cli_submit.SUBMIT, "bench": cli_bench.BENCH}


def build_parser() -> argparse.ArgumentParser:
    return stages.build_parser(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    return stages.run_command(argv, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
