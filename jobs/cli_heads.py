"""`cast train-heads`: fit encoder/decoder heads from two activation stores."""
from __future__ import annotations

import json

from jobs.args import Command, to_dataclass


def cmd_train_heads(ns) -> int:
    """For every bridged (source layer, target layer) of the layer map and every site, fit
    an encoder (target -> source space) and a decoder (source -> target space) on aligned
    token pairs read from the two stores. No model is loaded and no GPU is used; each head
    is an independent task, skipped on re-runs when its inputs and config are unchanged.
    Writes HEADS/<direction>/<site>/*.safetensors + .json, HEADS/index.json, summary.md
    and r2_by_layer.png."""
    from heads.headset import write_summary
    from heads.run import TrainHeadsConfig, run_train_heads
    from storage.fs import as_path

    cfg = to_dataclass(TrainHeadsConfig, ns)
    index = run_train_heads(cfg, progress=not ns.quiet)
    out = as_path(cfg.out)
    print(write_summary(index, out))
    print(json.dumps({"heads": len(index["heads"]), "out": str(out), "plot": str(out / "r2_by_layer.png"),
                      "skipped": sum(1 for h in index["heads"] if h.get("skipped"))}))
    return 0


TRAIN_HEADS = Command("fit encoder/decoder projection heads from the stores (CPU, Ray tasks)", cmd_train_heads,
                      config="heads.run:TrainHeadsConfig", quiet="no progress bar")
