import json

import numpy as np
import pytest

import storage
from jobs.cli import build_parser
from pipeline.align.pairs import AlignConfig, run_align
from pipeline.align.layermap import (LayermapConfig, cka_matrix, linear_cka, monotone_assignment, norm_ratio,
                                     relative_depth, run_layermap, sink_rows)
from storage.artifacts import load_layermap
from storage.layout import StoreError
from tests.pipeline.align.align_stores import build


@pytest.fixture(scope="session")
def stores(tmp_path_factory):
    return build(tmp_path_factory.mktemp("align_stores"))


@pytest.fixture(scope="session")
def aligned(stores, tmp_path_factory):
    """{name: alignment dir}: llama->gemma (cross tokenizer) and llama->llama (itself)."""
    root = tmp_path_factory.mktemp("alignments")
    out = {}
    for name, (a, b) in {"cross": ("llama", "gemma"), "self": ("llama", "llama")}.items():
        run_align(AlignConfig(str(stores[a]), str(stores[b]), str(root / name)))
        out[name] = root / name
    return out


# --------------------------------------------------------------------------- CKA


def test_cka_of_a_sample_with_itself_is_one():
    x = np.random.default_rng(0).normal(size=(200, 16))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_rotation_and_isotropic_scale():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))  # correlated features
    y = x[:, :8] + 0.5 * rng.normal(size=(300, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    base = linear_cka(x, y)
    assert 0.1 < base < 0.99
    assert linear_cka(x, y @ q) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, 37.5 * y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, -0.01 * (y @ q)) == pytest.approx(base, rel=1e-10)
    assert linear_cka(y, x) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, y + 5.0) == pytest.approx(base, rel=1e-10)  # centring removes offsets


def test_cka_of_unrelated_samples_is_small():
    rng = np.random.default_rng(2)
    assert linear_cka(rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))) < 0.05


def test_one_sink_token_fakes_similarity_until_dropped():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    x[7] += 500.0  # one attention-sink-like token, huge in both models
    y[7] -= 300.0
    assert linear_cka(x, y) > 0.9
    # Token 7 is huge at every "layer"; token 9 only at one: only 7 is a sink.
    layers = [x, 1.1 * x, x.copy()]
    layers[1][9] += 400.0
    drop = sink_rows([norm_ratio(a) for a in layers], 10.0) | sink_rows([norm_ratio(y)], 10.0)
    assert np.flatnonzero(drop).tolist() == [7]
    assert linear_cka(x[~drop], y[~drop]) < 0.05
    assert not sink_rows([norm_ratio(x)], 0).any()


# --------------------------------------------------------------------------- assignment


def test_dp_hand_example():
    # rows: source layers 0..2, columns: target layers 0..2. Greedy per column would go
    # 2, 0, 2 (not monotone); the best monotone path is 0, 0, 2 (0.8 + 0.9 + 0.9 = 2.6).
    c = np.array([[0.8, 0.9, 0.1],
                  [0.1, 0.2, 0.3],
                  [0.85, 0.1, 0.9]])
    assert monotone_assignment(c) == [0, 0, 2]


def test_dp_monotone_and_at_least_relative_depth():
    rng = np.random.default_rng(3)
    for n_src, n_tgt in [(30, 18), (5, 9), (1, 4), (7, 1)]:
        c = rng.random((n_src, n_tgt))
        path = monotone_assignment(c)
        assert len(path) == n_tgt and all(0 <= s < n_src for s in path)
        assert all(a <= b for a, b in zip(path, path[1:]))
        rel = relative_depth(list(range(n_src)), list(range(n_tgt)), n_src, n_tgt)
        assert all(a <= b for a, b in zip(rel, rel[1:]))
        total = sum(c[s, t] for t, s in enumerate(path))
        assert total >= sum(c[s, t] for t, s in enumerate(rel)) - 1e-12
        if n_src * n_tgt <= 9 * 5:  # brute force over all monotone paths where cheap
            import itertools
            best = max(sum(c[s, t] for t, s in enumerate(p))
                       for p in itertools.combinations_with_replacement(range(n_src), n_tgt))
            assert total == pytest.approx(best)


def test_relative_depth():
    assert relative_depth([0, 1, 2, 3], [0, 1, 2, 3], 4, 4) == [0, 1, 2, 3]
    rel = relative_depth(list(range(30)), list(range(18)), 30, 18)
    assert rel[-1] == 29 and rel[0] == 1 and rel[8] == 14  # block 9/18 ~ block 15/30
    # Only some source layers stored: snap to the nearest stored one (as an index).
    assert relative_depth([0, 10, 20, 29], [17], 30, 18) == [3]


# --------------------------------------------------------------------------- stores


@pytest.mark.parametrize("standardize", [False, True])
def test_same_model_maps_layer_i_to_i(stores, aligned, tmp_path, standardize):
    meta = run_layermap(LayermapConfig(str(stores["llama"]), str(stores["llama"]), str(aligned["self"]),
                                       str(tmp_path / "lm"), n_pairs=150, standardize=standardize))
    lm = load_layermap(tmp_path / "lm")
    assert lm.mapping == {i: i for i in range(4)} == lm.relative_depth
    assert np.allclose(np.diag(lm.cka), 1.0)
    assert lm.n_pairs == meta["n_pairs"] == 150 - meta["n_outliers"]
    assert lm.pairs() == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_cross_model_layermap_artifact(stores, aligned, tmp_path, capsys):
    ns = build_parser().parse_args(["layermap", str(stores["llama"]), str(stores["gemma"]), "--align", str(aligned["cross"]),
                            "--out", str(tmp_path / "lm"), "--quiet"])
    assert ns.func(ns) == 0
    assert "total CKA" in capsys.readouterr().out
    lm = load_layermap(tmp_path / "lm")
    raw = json.loads((tmp_path / "lm" / "layermap.json").read_text())
    assert lm.source_layers == [0, 1, 2, 3] and lm.target_layers == [0, 1, 2]
    assert lm.cka.shape == (4, 3) and ((lm.cka >= 0) & (lm.cka <= 1 + 1e-9)).all()
    chosen = [lm.mapping[t] for t in lm.target_layers]
    assert chosen == sorted(chosen)
    assert lm.total_cka["chosen"] >= lm.total_cka["relative_depth"] - 1e-12
    assert lm.site == "resid" and lm.source["model"] == "tiny-llama" and lm.target["model"] == "tiny-gemma3"
    assert raw["peak_rss_mib"] > 0 and raw["alignment"]["n_pairs"] > 0
    assert (tmp_path / "lm" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    # The held/streamed choice must not change the matrix: recompute with roles swapped.
    src, tgt = storage.open_store(stores["llama"]), storage.open_store(stores["gemma"])
    from storage.artifacts import load_alignment
    r_s, r_t = load_alignment(aligned["cross"]).sample(4096, seed=0)
    swapped, keep = cka_matrix(tgt, src, "resid", r_t, r_s, standardize=True, outlier_norm=10.0)
    assert np.allclose(swapped, lm.cka.T, atol=1e-6) and keep.sum() == lm.n_pairs
    lm.check_stores(src, tgt)


def test_refuses_alignment_of_other_stores(stores, aligned, tmp_path):
    cfg = LayermapConfig(str(stores["llama"]), str(stores["llama"]), str(aligned["cross"]), str(tmp_path / "x"))
    with pytest.raises(StoreError, match=r"made for another target store(.|\n)*tiny-gemma3(.|\n)*cast align"):
        run_layermap(cfg)
    cfg = LayermapConfig(str(stores["gemma"]), str(stores["llama"]), str(aligned["cross"]), str(tmp_path / "x"))
    with pytest.raises(StoreError, match="other way round"):
        run_layermap(cfg)
    cfg = LayermapConfig(str(stores["llama"]), str(stores["gemma_seg"]), str(aligned["cross"]), str(tmp_path / "x"))
    with pytest.raises(StoreError, match="segmentation hash"):
        run_layermap(cfg)
    assert not (tmp_path / "x").exists()


def test_refuses_bad_site_and_missing_files(stores, aligned, tmp_path):
    cfg = LayermapConfig(str(stores["llama"]), str(stores["gemma"]), str(aligned["cross"]), str(tmp_path / "x"),
                         site="mlp_in")
    with pytest.raises(StoreError, match=r"--site mlp_in: .* does not store it"):
        run_layermap(cfg)
    with pytest.raises(StoreError, match="cast layermap"):
        load_layermap(tmp_path)
    with pytest.raises(StoreError, match="cast align"):
        run_layermap(LayermapConfig(str(stores["llama"]), str(stores["gemma"]), str(tmp_path), str(tmp_path / "x")))
