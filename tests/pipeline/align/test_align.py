import json
import shutil

import numpy as np
import pytest

import storage
from tests.pipeline.align.align_stores import build
from jobs.cli import build_parser
from pipeline.align.pairs import AlignConfig, align_offsets, match_ends, run_align
from storage.artifacts import load_alignment
from storage.layout import StoreError


@pytest.fixture(scope="session")
def stores(tmp_path_factory):
    return build(tmp_path_factory.mktemp("align_stores"))


def all_tokens(path):
    return {k: v.compute() for k, v in storage.open_store(path).tokens().items()}


# --------------------------------------------------------------------------- pure function


def test_hand_built_pairs():
    # "The cat sat." -- source: byte-level style, no BOS; target: BOS then other cuts.
    src = [(0, 3), (3, 7), (7, 11), (11, 12)]            # The | _cat | _sat | .
    tgt = [(0, 0), (0, 1), (1, 3), (3, 7), (7, 12)]      # <bos> | T | he | _cat | _sat.
    # ends 3, 7, 12 are shared; 11 (src) and 1 (tgt) are not; BOS is never aligned.
    assert align_offsets(src, tgt) == [(0, 2), (1, 3), (3, 4)]


def test_hand_built_pairs_split_character_and_specials():
    # "café au": the source splits "é" into two byte tokens with the same offsets (3, 4);
    # only the second has read the whole character. Zero-width specials never align.
    src = [(0, 3), (3, 4), (3, 4), (4, 7), (7, 7)]       # caf | é1 | é2 | _au | <eos>
    tgt = [(0, 0), (0, 4), (4, 6), (6, 7)]               # <bos> | café | _a | u
    assert align_offsets(src, tgt) == [(2, 1), (3, 3)]
    assert align_offsets([(0, 0)], [(0, 0)]) == []


def test_identical_tokenizations_align_everything_but_bos():
    offs = [(0, 0), (0, 2), (2, 5), (5, 9)]
    assert align_offsets(offs, offs) == [(1, 1), (2, 2), (3, 3)]


def test_same_end_in_different_segments_does_not_pair():
    src = {"segment_id": np.array([0, 0, 1]), "char_start": np.array([0, 2, 0]), "char_end": np.array([2, 5, 5])}
    tgt = {"segment_id": np.array([1, 1]), "char_start": np.array([0, 2]), "char_end": np.array([2, 5])}
    i, j = match_ends(src, tgt)
    assert i.tolist() == [2] and j.tolist() == [1]


# --------------------------------------------------------------------------- stores


def test_align_stores_matches_brute_force(stores, tmp_path):
    meta = run_align(AlignConfig(str(stores["llama"]), str(stores["gemma"]), str(tmp_path / "al")))
    s, t = all_tokens(stores["llama"]), all_tokens(stores["gemma"])
    shared = sorted(set(s["segment_id"]) & set(t["segment_id"]))
    # The gemma store was capped by --max-tokens: it covers fewer segments.
    assert len(shared) == len(set(t["segment_id"])) < len(set(s["segment_id"]))
    expect = []
    for seg in shared:
        rs, rt = np.flatnonzero(s["segment_id"] == seg), np.flatnonzero(t["segment_id"] == seg)
        offs = lambda tok, r: list(zip(tok["char_start"][r], tok["char_end"][r]))  # noqa: E731
        expect += [(rs[i], rt[j]) for i, j in align_offsets(offs(s, rs), offs(t, rt))]
    al = load_alignment(tmp_path / "al")
    p = al.pairs()
    assert list(zip(p["src_row"], p["tgt_row"])) == expect
    assert al.n_pairs == meta["n_pairs"] == len(expect) > 0
    assert (s["char_end"][p["src_row"]] == t["char_end"][p["tgt_row"]]).all()
    assert (s["segment_id"][p["src_row"]] == p["segment_id"]).all()
    assert (t["segment_id"][p["tgt_row"]] == p["segment_id"]).all()
    assert (t["char_end"][p["tgt_row"]] > 0).all()
    assert (s["position"][p["src_row"]] == p["src_pos"]).all()
    assert (t["position"][p["tgt_row"]] == p["tgt_pos"]).all()
    assert (p["tgt_pos"] >= 1).all()  # the target's position 0 is its BOS
    # Coverage: aligned / text tokens in shared segments, per side.
    in_s, in_t = np.isin(s["segment_id"], shared), np.isin(t["segment_id"], shared)
    text_t = int((in_t & (t["char_end"] > t["char_start"])).sum())
    assert text_t < in_t.sum()  # the gemma BOS tokens are not counted as text
    assert al.coverage["target"] == pytest.approx(len(expect) / text_t)
    assert al.coverage["source"] == pytest.approx(len(expect) / in_s.sum())
    assert 0.5 < al.coverage["source"] <= 1 and 0.9 < al.coverage["target"] <= 1
    assert al.source["model"] == "tiny-llama" and al.target["model"] == "tiny-gemma3"
    assert al.target["n_tokens"] == storage.open_store(stores["gemma"]).n_tokens
    assert meta["counts"]["segments_shared"] == len(shared)


def test_small_row_groups_and_sample(stores, tmp_path):
    run_align(AlignConfig(str(stores["llama"]), str(stores["gemma"]), str(tmp_path / "a"), row_group=7))
    al = load_alignment(tmp_path / "a")
    whole = al.pairs()
    assert sum(len(b["src_row"]) for b in al.iter_batches(batch_rows=5)) == al.n_pairs
    src, tgt = al.sample(20, seed=3)
    assert len(src) == 20 and (np.diff(src) > 0).all()
    assert set(zip(src, tgt)) <= set(zip(whole["src_row"], whole["tgt_row"]))
    assert np.array_equal(al.sample(20, seed=3)[0], src)
    assert len(al.sample(10**6)[0]) == al.n_pairs
    # min_position drops pairs whose tokens open a sequence (attention sinks).
    late = (whole["src_pos"] >= 2) & (whole["tgt_pos"] >= 2)
    src2, tgt2 = al.sample(10**6, min_position=2)
    assert list(zip(src2, tgt2)) == list(zip(whole["src_row"][late], whole["tgt_row"][late]))
    assert late.sum() < al.n_pairs


def test_store_with_itself_aligns_every_text_token(stores, tmp_path):
    meta = run_align(AlignConfig(str(stores["gemma"]), str(stores["gemma"]), str(tmp_path / "self")))
    t = all_tokens(stores["gemma"])
    text = t["char_end"] > t["char_start"]
    # Every distinct (segment, end) of a text token pairs with itself; where a metaspace
    # "▁" token and the next one share an end, only the later one is kept.
    ends = set(zip(t["segment_id"][text], t["char_end"][text]))
    assert meta["n_pairs"] == len(ends)
    assert meta["coverage"]["source"] == meta["coverage"]["target"] == pytest.approx(len(ends) / text.sum())
    p = load_alignment(tmp_path / "self").pairs()
    assert (p["src_row"] == p["tgt_row"]).all()


def test_refuses_different_segmentation(stores, tmp_path):
    with pytest.raises(StoreError) as e:
        run_align(AlignConfig(str(stores["llama"]), str(stores["gemma_seg"]), str(tmp_path / "x")))
    msg = str(e.value)
    assert str(stores["llama"]) in msg and str(stores["gemma_seg"]) in msg
    assert "segmentation hash" in msg and "--max-chars" in msg
    assert not (tmp_path / "x").exists()


def test_refuses_different_corpus(stores, tmp_path):
    other = tmp_path / "other.zarr"
    shutil.copytree(stores["gemma"], other)
    root = json.loads((other / "zarr.json").read_text())
    root["attributes"]["cast"]["corpus"]["hash"] = "0" * 64
    (other / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(StoreError, match=r"differ in corpus hash .*--corpus") as e:
        run_align(AlignConfig(str(stores["llama"]), str(other), str(tmp_path / "x")))
    assert str(other) in str(e.value) and str(stores["llama"]) in str(e.value)


def test_rerun_is_a_noop_and_other_stores_need_force(stores, tmp_path):
    out = str(tmp_path / "al")
    first = run_align(AlignConfig(str(stores["llama"]), str(stores["gemma"]), out))
    assert run_align(AlignConfig(str(stores["llama"]), str(stores["gemma"]), out)) == first
    with pytest.raises(StoreError, match="--force"):
        run_align(AlignConfig(str(stores["gemma"]), str(stores["gemma"]), out))
    again = run_align(AlignConfig(str(stores["gemma"]), str(stores["gemma"]), out, force=True))
    assert again["source"]["model"] == "tiny-gemma3"
    assert [p.name for p in tmp_path.iterdir()] == ["al"]  # no temp dirs left behind


def test_load_alignment_errors(tmp_path):
    with pytest.raises(StoreError, match="cast align"):
        load_alignment(tmp_path)


def test_cli(stores, tmp_path, capsys):
    parser = build_parser()
    ns = parser.parse_args(["align", str(stores["llama"]), str(stores["gemma"]), "--out", str(tmp_path / "c")])
    assert ns.func(ns) == 0
    out = capsys.readouterr().out
    assert "coverage source" in out and "pairs" in out
    choices = parser._subparsers._group_actions[0].choices
    assert "--row-group" in choices["align"].format_help()
    assert "--no-standardize" in choices["layermap"].format_help()  # help text renders (no stray %)
