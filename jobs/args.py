"""Build argparse flags from a config dataclass, using each field's docstring as its
help, so a stage's flags, defaults and documentation live in one place."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import textwrap
import typing


def field_docs(cls) -> dict[str, str]:
    """The string literal that follows each field in the class body, or in the body of the
    dataclass it extends (a stage config may extend another's, as export does distill's)."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _set_field_doc(f: dataclasses.Field) -> str:
    """A field that only sets a field of another config (metadata "sets", as `cast run`'s
    flags do) is documented there."""
    targets = f.metadata.get("sets")
    if not targets:
        return ""
    cls, name = targets[0]
    return field_docs(cls).get(name, "")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, positional: tuple[str, ...] = ()) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    own = inspect.get_annotations(cls)  # a config's own flags first, then those it extends
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        typ = hints[f.name]
        base = [a for a in typing.get_args(typ) if a is not type(None)]
        typ = base[0] if base else typ
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_ = (docs.get(f.name) or _set_field_doc(f)) + ("" if required else f" (default: {default})")
        if f.name in positional:
            parser.add_argument(f.name, type=typ, help=help_)
        elif typ is bool:
            parser.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                                default=default, help=help_)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=typ, default=default,
                                required=required, help=help_, metavar=f.name.upper())


def to_dataclass(cls, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})


@dataclasses.dataclass(frozen=True)
class Command:
    """One `cast` subcommand, as the tables in jobs/stages.py and jobs/cli.py list it."""

    help: str
    """The line `cast --help` shows."""
    run: typing.Callable[[argparse.Namespace], int] | None = None
    """Runs it and returns the exit status; its docstring is what `cast <command> --help` says."""
    config: str = ""
    """"module:Class" of the config dataclass whose fields are the flags (imported only
    when the parser is built)."""
    positional: tuple[str, ...] = ()
    """Config fields taken as positional arguments."""
    add_args: typing.Callable[[argparse.ArgumentParser], None] | None = None
    """Adds flags beyond the config's."""
    quiet: str = ""
    """Help of the command's --quiet flag; none without it."""
    description: str = ""
    """Instead of run's docstring."""
    preformatted: bool = False
    """Keep the description's line breaks (examples, tables)."""
    subcommands: dict[str, "Command"] | None = None
    """For a command of commands (`cast lora train`)."""


def load_config(ref: str) -> type:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def add_command(subparsers, name: str, cmd: Command, dest: str = "command") -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter if cmd.preformatted else argparse.HelpFormatter
    description = cmd.description or inspect.getdoc(cmd.run) or ""
    p = subparsers.add_parser(name, help=cmd.help, description=description, formatter_class=fmt)
    if cmd.config:
        add_dataclass_args(p, load_config(cmd.config), cmd.positional)
    if cmd.add_args:
        cmd.add_args(p)
    if cmd.quiet:
        p.add_argument("--quiet", action="store_true", help=cmd.quiet)
    if cmd.subcommands:
        sub = p.add_subparsers(dest=f"{name}_{dest}", required=True, metavar="SUBCOMMAND")
        for child, sub_cmd in cmd.subcommands.items():
            add_command(sub, child, sub_cmd, dest)
    if cmd.run:
        p.set_defaults(func=cmd.run)
    return p
