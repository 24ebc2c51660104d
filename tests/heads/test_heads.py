"""Head training from stores alone: accuracy on known maps, skipping, retries, no model."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import heads.run as run_mod
import storage
from heads.headset import load_heads
from heads.run import TrainHeadsConfig, run_train_heads
from tests.heads.synth import build

ROOT = Path(__file__).resolve().parents[2]
M = np.random.default_rng(1).standard_normal((12, 12)) + 2 * np.eye(12)  # invertible


def linear(x):
    return x[:, :12] @ M + 0.5


def nonlinear(x):
    return np.tanh(x[:, :12] * x[:, 4:]) * 2 + np.sin(x[:, :12])


@pytest.fixture(scope="module")
def linear_set(tmp_path_factory):
    return build(tmp_path_factory.mktemp("lin"), linear, d_src=12)


def r2s(index, direction, kind):
    return [h["metrics"]["heldout"]["r2"] for h in index["heads"]
            if h["spec"]["direction"] == direction and h["spec"]["kind"] == kind]


def test_linear_map_is_recovered_both_ways(linear_set, tmp_path):
    index = run_train_heads(TrainHeadsConfig(**linear_set, out=str(tmp_path / "h"), workers=0), progress=False)
    for direction in ("encoder", "decoder"):
        for kind in ("mlp", "ridge"):
            assert min(r2s(index, direction, kind)) > 0.99, (direction, kind)
    names = sorted(p.name for p in (tmp_path / "h" / "decoder" / "attn_in").iterdir())
    assert names == ["T00-S00.mlp.json", "T00-S00.mlp.safetensors", "T00-S00.ridge.json", "T00-S00.ridge.safetensors"]
    # The loaded decoder maps raw source activations onto raw target activations.
    hs = load_heads(tmp_path / "h")
    x = np.random.default_rng(5).standard_normal((64, 12)).astype(np.float32)
    with torch.no_grad():
        y = hs.head("decoder", 0, "attn_in", "ridge")(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, linear(x), rtol=1e-2, atol=2e-2 * np.abs(linear(x)).max())


def test_mlp_head_clearly_beats_ridge_on_a_nonlinear_map(tmp_path):
    paths = build(tmp_path, nonlinear)
    index = run_train_heads(TrainHeadsConfig(**paths, out=str(tmp_path / "h"), workers=0, directions="decoder"),
                            progress=False)
    mlp, ridge = r2s(index, "decoder", "mlp")[0], r2s(index, "decoder", "ridge")[0]
    assert mlp > ridge + 0.3 and mlp > 0.6, (mlp, ridge)


def test_streaming_loader_in_a_small_memory_budget(linear_set, tmp_path):
    index = run_train_heads(TrainHeadsConfig(**linear_set, out=str(tmp_path / "h"), workers=0, kinds="ridge",
                                             memory_budget_mb=0, block_rows=700), progress=False)
    assert all(h["metrics"]["streamed"] for h in index["heads"])
    assert min(r2s(index, "decoder", "ridge")) > 0.99


def test_rerun_skips_and_changed_config_retrains(linear_set, tmp_path):
    cfg = dict(**linear_set, out=str(tmp_path / "h"), workers=0, kinds="ridge")
    first = run_train_heads(TrainHeadsConfig(**cfg), progress=False)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "h").rglob("*.safetensors")}
    again = run_train_heads(TrainHeadsConfig(**cfg), progress=False)
    assert all(h.get("skipped") for h in again["heads"]) and len(again["heads"]) == len(first["heads"]) == 2
    assert files == {p: p.stat().st_mtime_ns for p in (tmp_path / "h").rglob("*.safetensors")}
    # The same stores at another path (moved, remounted) are the same inputs.
    import shutil

    root = Path(linear_set["src_store"]).parent
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    at_new_path = {k: str(moved / Path(v).name) for k, v in linear_set.items()}
    again = run_train_heads(TrainHeadsConfig(**{**cfg, **at_new_path}), progress=False)
    assert all(h.get("skipped") for h in again["heads"])
    changed = run_train_heads(TrainHeadsConfig(**{**cfg, "holdout": 0.2}), progress=False)
    assert not any(h.get("skipped") for h in changed["heads"])


def test_only_fits_the_heads_named_and_they_are_the_same_heads(linear_set, tmp_path):
    cfg = dict(**linear_set, workers=0, kinds="ridge,mlp", epochs=2)
    every = run_train_heads(TrainHeadsConfig(**cfg, out=str(tmp_path / "all")), progress=False)
    some = run_train_heads(TrainHeadsConfig(**cfg, out=str(tmp_path / "some"),
                                            only="ridge:encoder:attn_in,mlp:decoder:attn_in"), progress=False)
    assert len(every["heads"]) == 4
    assert sorted((h["spec"]["kind"], h["spec"]["direction"]) for h in some["heads"]) == [("mlp", "decoder"),
                                                                                          ("ridge", "encoder")]
    same = {h["name"]: h["hash"] for h in every["heads"]}
    assert all(same[h["name"]] == h["hash"] for h in some["heads"])
    with pytest.raises(ValueError, match="kind:direction:site"):
        TrainHeadsConfig(**cfg, out=str(tmp_path / "x"), only="ridge:encoder")


def test_a_failed_head_is_retried(linear_set, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = run_mod.fit_head

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("store read interrupted")
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "fit_head", flaky)
    index = run_train_heads(TrainHeadsConfig(**linear_set, out=str(tmp_path / "h"), workers=0, kinds="ridge"),
                            progress=False)
    assert len(index["heads"]) == 2 and calls["n"] == 3
    assert "failed (OSError: store read interrupted); retry 1/2" in capsys.readouterr().err

    monkeypatch.setattr(run_mod, "fit_head", lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(RuntimeError, match="failed 3 times; last error: disk gone"):
        run_train_heads(TrainHeadsConfig(**linear_set, out=str(tmp_path / "h2"), workers=0, kinds="ridge"),
                        progress=False)


def test_ray_tasks_give_the_same_heads(linear_set, tmp_path, ray_local):
    a = run_train_heads(TrainHeadsConfig(**linear_set, out=str(tmp_path / "a"), workers=0, kinds="ridge"), progress=False)
    b = run_train_heads(TrainHeadsConfig(**linear_set, out=str(tmp_path / "b"), workers=2, kinds="ridge"), progress=False)
    for ha, hb in zip(a["heads"], b["heads"]):
        assert ha["name"] == hb["name"]
        assert ha["metrics"]["heldout"]["r2"] == pytest.approx(hb["metrics"]["heldout"]["r2"], abs=1e-6)


def test_training_needs_no_model_files(linear_set, tmp_path):
    """A fresh process with an empty model cache trains heads and never imports a model library."""
    code = textwrap.dedent(f"""
        import os, sys
        os.environ["CAST_CACHE"] = {str(tmp_path / "empty-cache")!r}
        from heads.run import TrainHeadsConfig, run_train_heads
        idx = run_train_heads(TrainHeadsConfig(**{linear_set!r}, out={str(tmp_path / "h")!r}, workers=0,
                                               kinds="ridge"), progress=False)
        assert len(idx["heads"]) == 2
        assert "transformers" not in sys.modules, "head training imported transformers"
        assert not os.path.exists(os.path.join(os.environ["CAST_CACHE"], "models"))
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_index_and_artifacts_are_safetensors_and_json(linear_set, tmp_path):
    run_train_heads(TrainHeadsConfig(**linear_set, out=str(tmp_path / "h"), workers=0, kinds="ridge"), progress=False)
    files = sorted(p.suffix for p in (tmp_path / "h").rglob("*") if p.is_file())
    assert set(files) == {".json", ".safetensors"}
    index = json.loads((tmp_path / "h" / "index.json").read_text())
    assert index["inputs"]["source"]["model"] == "src" and index["inputs"]["layermap"] == {"0": 0}


def test_an_index_under_the_old_kind_name_still_loads(linear_set, tmp_path):
    run_train_heads(TrainHeadsConfig(**linear_set, out=str(tmp_path / "h"), workers=0, kinds="ridge"), progress=False)
    index = json.loads((tmp_path / "h" / "index.json").read_text())
    assert index["kind"] == "cast.heads"
    (tmp_path / "h" / "index.json").write_text(json.dumps({**index, "kind": "cast-heads"}))  # as older releases wrote
    assert len(load_heads(tmp_path / "h").entries(kind="ridge")) == 2
    (tmp_path / "h" / "index.json").write_text(json.dumps({**index, "kind": "cast.alignment"}))
    with pytest.raises(storage.StoreError, match="not a CAST head index"):
        load_heads(tmp_path / "h")


def test_unseen_pairs_share_no_segment_with_training_rows():
    from heads.train import split_pairs, unseen_pairs

    rng = np.random.default_rng(0)
    n = 4000
    pairs = {"src_row": np.arange(n), "tgt_row": np.arange(n) + 7, "segment_id": np.repeat(np.arange(200), 20),
             "src_pos": np.tile(np.arange(20), 200), "tgt_pos": rng.integers(0, 20, n)}
    opts = {"min_position": 1, "max_pairs": 0, "holdout": 0.1, "seed": 0}
    src, tgt, held = split_pairs(pairs, opts)
    u_src, u_tgt = unseen_pairs(pairs, opts)
    np.testing.assert_array_equal(u_src, src[held])  # without sampling: exactly the held-out rows
    np.testing.assert_array_equal(u_tgt, u_src + 7)
    opts["max_pairs"] = 300
    src, _, held = split_pairs(pairs, opts)
    u_src, _ = unseen_pairs(pairs, opts)
    train_segs = set(pairs["segment_id"][src[~held]])
    assert len(u_src) > len(src) and not train_segs & set(pairs["segment_id"][u_src])
    assert set(src[held]) <= set(u_src)
    assert (pairs["src_pos"][u_src] >= 1).all() and (pairs["tgt_pos"][u_src] >= 1).all()


def test_noise_makes_heads_worse_by_a_known_amount_and_leaves_other_hashes_alone(linear_set, tmp_path):
    common = dict(**linear_set, kinds="ridge", directions="decoder", workers=0)
    clean = run_train_heads(TrainHeadsConfig(**common, out=str(tmp_path / "a")), progress=False)
    noisy = run_train_heads(TrainHeadsConfig(**common, out=str(tmp_path / "b"), noise=0.5), progress=False)
    again = run_train_heads(TrainHeadsConfig(**common, out=str(tmp_path / "a"), noise=0.0), progress=False)
    assert [h["hash"] for h in again["heads"]] == [h["hash"] for h in clean["heads"]]
    assert all(h.get("skipped") for h in again["heads"])  # --noise 0 is the default, not a new option
    assert [h["hash"] for h in noisy["heads"]] != [h["hash"] for h in clean["heads"]]
    r_clean, r_noisy = r2s(clean, "decoder", "ridge")[0], r2s(noisy, "decoder", "ridge")[0]
    assert r_clean > 0.99 and 0.3 < r_noisy < 0.95, (r_clean, r_noisy)
    with pytest.raises(ValueError, match="--noise"):
        TrainHeadsConfig(**common, out="x", noise=-1)


def test_stats_pairs_standardise_over_exactly_the_training_rows(tmp_path):
    """--stats pairs: each head's means and stds are those of the rows it trains on (no position-0
    sinks, nothing held out); --stats store (the default) keeps the store's, sinks included."""
    from heads.data import gather
    from heads.train import split_pairs
    from storage.artifacts import load_alignment

    paths = build(tmp_path, linear, d_src=12, sink=100.0)
    common = dict(**paths, workers=0, kinds="ridge")
    index = run_train_heads(TrainHeadsConfig(**common, out=str(tmp_path / "p"), stats="pairs", block_rows=700),
                            progress=False)  # statistics merged over several blocks
    assert index["options"]["stats"] == "pairs"
    src_rows, tgt_rows, held = split_pairs(load_alignment(paths["align"]).pairs(), index["options"])
    stores = {side: storage.open_store(paths[f"{side}_store"]) for side in ("src", "tgt")}
    rows = {"src": src_rows[~held], "tgt": tgt_rows[~held]}
    by_hand = {side: gather(stores[side].array(0, "attn_in"), rows[side]).astype(np.float64) for side in rows}
    hs = load_heads(tmp_path / "p")
    for direction, (x_side, y_side) in (("encoder", ("tgt", "src")), ("decoder", ("src", "tgt"))):
        head = hs.head(direction, 0, "attn_in", "ridge")
        for got, side in ((head.in_mean, x_side), (head.out_mean, y_side)):
            np.testing.assert_allclose(got.numpy(), by_hand[side].mean(0), rtol=1e-5, atol=1e-4)
        for got, side in ((head.in_std, x_side), (head.out_std, y_side)):
            np.testing.assert_allclose(got.numpy(), by_hand[side].std(0) + 1e-6, rtol=1e-5)
    assert min(r2s(index, "decoder", "ridge")) > 0.99
    # The default is what it was: the store's statistics over every token, the sinks inflating them.
    store = run_train_heads(TrainHeadsConfig(**common, out=str(tmp_path / "p")), progress=False)
    assert store["options"]["stats"] == "store" and not any(h.get("skipped") for h in store["heads"])
    mean, var = stores["tgt"].stats(0, "attn_in")
    enc = load_heads(tmp_path / "p").head("encoder", 0, "attn_in", "ridge")
    np.testing.assert_allclose(enc.in_std.numpy(), np.sqrt(var) + 1e-6, rtol=1e-5)
    assert (enc.in_std.numpy() / (by_hand["tgt"].std(0) + 1e-6)).min() > 2
    with pytest.raises(ValueError, match="--stats 'all': choose 'store' or 'pairs'"):
        TrainHeadsConfig(**common, out="x", stats="all")
