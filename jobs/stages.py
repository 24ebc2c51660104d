"""The pipeline's stages as `cast` subcommands: one table, the parser built from it, and
running a command with the errors users can fix turned into messages.

A stage runs the same three ways: `cast STAGE`, as a Ray job entrypoint
`python -m jobs.STAGE` (jobs/entrypoint.py), and `cast submit STAGE` (jobs/submit.py,
which checks a stage's flags with this parser before submitting). jobs/cli.py adds the
two commands that are not stages, submit and bench.
"""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from jobs import cli_align, cli_bridge, cli_cache, cli_heads, cli_lora, cli_run
from jobs.args import Command, add_command

USAGE = """\
CAST moves a LoRA between LLM families through activation-space projection heads.

    cast fetch-model smollm2-135m        fetch + dequantise a real model once
    cast extract --model gemma3-270m --out runs/gemma.zarr
    cast inspect runs/gemma.zarr
    cast verify runs/gemma.zarr
    cast run                             the whole pipeline on the embedded defaults
    cast <command> --help                what each stage does, with its defaults
"""

# In pipeline order. A new stage is a Command in a jobs/cli_*.py module and one line here
# (and, to run it as a Ray job, a jobs/<stage>.py entrypoint).
STAGES: dict[str, Command] = {
    "fetch-model": cli_cache.FETCH_MODEL,
    "fetch-corpus": cli_cache.FETCH_CORPUS,
    "extract": cli_cache.EXTRACT,
    "inspect": cli_cache.INSPECT,
    "verify": cli_cache.VERIFY,
    "align": cli_align.ALIGN,
    "layermap": cli_align.LAYERMAP,
    "train-heads": cli_heads.TRAIN_HEADS,
    "lora": cli_lora.LORA,
    "evaluate": cli_lora.EVALUATE,
    "readout": cli_bridge.READOUT,
    "transfer": cli_bridge.TRANSFER,
    "generate": cli_bridge.GENERATE,
    "export": cli_bridge.EXPORT,
    "distill": cli_bridge.DISTILL,
    "validate": cli_bridge.VALIDATE,
    "run": cli_run.RUN,
}


def build_parser(commands: dict[str, Command] = STAGES) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cast", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in commands.items():
        add_command(sub, name, cmd)
    return p


def run_command(argv: list[str] | None = None, commands: dict[str, Command] = STAGES) -> int:
    """Parse and run one command. A bad input the user can fix (corpus, model, store, site,
    flag value) is one line on stderr and exit status 2, not a traceback. Object-store URLs
    among the flags are checked first (backend installed, bucket there), so such a mistake
    ends the command before it reads or writes anything."""
    from pipeline.cache.corpus import CorpusError
    from pipeline.cache.hooks import SiteError
    from pipeline.cache.models import ModelError
    from pipeline.cache.writeback import UnitWriteError
    from runtime.work import WorkerLost
    from storage.fs import check_location, urls_in
    from storage.layout import StoreError

    args = build_parser(commands).parse_args(argv)
    if getattr(args, "quiet", False):
        quiet_libraries()
    out = _new_local_dir(getattr(args, "out", None))
    code = 1
    try:
        for url in urls_in(vars(args).values()):
            check_location(url)
        code = args.func(args)
        return code
    except (CorpusError, ModelError, StoreError, SiteError, ValueError) as e:
        code = _fail(args.command, e, 2)
        return code
    except WorkerLost as e:
        return _fail(args.command, e, 1)
    except UnitWriteError as e:  # a unit's write failed on the writer thread: say why, as if inline
        cause = getattr(e, "error", None)
        if isinstance(cause, (StoreError, ValueError)):
            code = _fail(args.command, cause, 2)
        else:
            code = _fail(args.command, e, 1)
        return code
    except OSError as e:
        if e.errno not in UNWRITABLE:
            raise
        code = _fail(args.command, f"cannot write {e.filename or 'a file'} ({e.strerror}); choose a writable "
                                   f"--out, or point CAST_CACHE at a writable directory if it is the cache", 2)
        return code
    except KeyboardInterrupt:
        print(f"cast {args.command}: interrupted; committed units are kept, re-run to resume", file=sys.stderr)
        return 130
    finally:
        if code != 0 and out is not None and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed stage leaves no empty --out behind (it did not exist before)


# A path the user can fix by choosing another one: read-only, no permission, no space.
UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}


def _fail(command: str, message, code: int) -> int:
    print(f"cast {command}: error: {message}", file=sys.stderr)
    return code


def quiet_libraries() -> None:
    """--quiet silences the libraries' progress bars too (transformers' weight loading, the
    hub's downloads, any tqdm), here and in the Ray workers started after, which inherit
    the environment."""
    import os

    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def _new_local_dir(out) -> Path | None:
    """--out when it is a local path that does not exist yet (so a failure may remove it)."""
    from storage.fs import is_url

    if not isinstance(out, str) or is_url(out):
        return None
    p = Path(out)
    return None if p.exists() else p
