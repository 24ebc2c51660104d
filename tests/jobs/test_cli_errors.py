"""Every bad input to the activation-cache commands ends in a clear message, exit 2,
and loses nothing already committed."""
from __future__ import annotations

import argparse

import pytest

import storage
from jobs.cli import build_parser, main
from storage.check import verify

BASE = ["--max-tokens", "300", "--max-chars", "160", "--workers", "0", "--quiet"]


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--model", "no-such-model"], "not a known name (gemma3-270m, smollm2-135m, tiny-gemma3, tiny-llama)"),
    (["--model", "tiny-llama", "--sites", "resid,qproj.out"], "--sites: unknown site(s) ['qproj.out']"),
    (["--model", "tiny-llama", "--layers", "2-9"], "--layers: [4, 5, 6, 7, 8, 9] outside this model's 0..3"),
    (["--model", "tiny-llama", "--layers", "first"], "--layers: cannot parse 'first'"),
    (["--model", "tiny-llama", "--dtype", "int8"], "--dtype 'int8': choose one of bfloat16, float16, float32"),
    (["--model", "tiny-llama", "--max-tokens", "0"], "--max-tokens must be positive"),
])
def test_bad_flags(tmp_path, corpus_dir, capsys, argv, message):
    code, err = run(capsys, "extract", "--out", str(tmp_path / "s"), "--corpus", str(corpus_dir), *BASE, *argv)
    assert code == 2
    assert message in err


def test_bad_corpus_names_the_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, err = run(capsys, "extract", "--model", "tiny-llama", "--out", str(tmp_path / "s"),
                    "--corpus", str(empty), *BASE)
    assert code == 2 and str(empty) in err and "empty" in err
    code, err = run(capsys, "extract", "--model", "tiny-llama", "--out", str(tmp_path / "s"),
                    "--corpus", "no-such-corpus", *BASE)
    assert code == 2 and "nlp-corpus" in err
    assert not (tmp_path / "s").exists()


def test_store_made_with_other_settings_is_not_clobbered(tmp_path, corpus_dir, capsys):
    out = str(tmp_path / "s.zarr")
    assert main(["extract", "--model", "tiny-llama", "--out", out, "--corpus", str(corpus_dir),
                 "--sites", "resid", *BASE]) == 0
    units = storage.open_store(out).units
    code, err = run(capsys, "extract", "--model", "tiny-llama", "--out", out, "--corpus", str(corpus_dir),
                    "--sites", "resid,attn_in", *BASE)
    assert code == 2 and "different settings (sites, dims)" in err and "Use a new --out" in err
    code, err = run(capsys, "extract", "--model", "tiny-gemma3", "--out", out, "--corpus", str(corpus_dir),
                    "--sites", "resid", *BASE)
    assert code == 2 and "model" in err
    assert storage.open_store(out).units == units and verify(out).ok


def test_non_store_directory_is_refused(tmp_path, corpus_dir, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, err = run(capsys, "extract", "--model", "tiny-llama", "--out", str(tmp_path),
                    "--corpus", str(corpus_dir), *BASE)
    assert code == 2 and "exists and is not empty; refusing to overwrite" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_inspect_and_verify_on_a_non_store(tmp_path, capsys):
    for cmd in ("inspect", "verify"):
        code, err = run(capsys, cmd, str(tmp_path))
        assert code == 2 and "is not an activation store" in err


def subcommands(parser, prefix="cast"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from subcommands(sub, f"{prefix} {name}")


def test_every_flag_with_a_default_states_it_in_its_help():
    checked = 0
    for name, p in subcommands(build_parser()):
        assert p.description and "%%" not in p.format_help(), f"{name}: no description, or a stray %%"
        for a in p._actions:
            if not a.option_strings or a.default in (None, False, [], argparse.SUPPRESS):
                continue
            assert f"(default: {a.default})" in p._get_formatter()._expand_help(a), (name, a.option_strings)
            checked += 1
    assert checked > 60  # every stage's flags were seen, not a few
