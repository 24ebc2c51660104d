"""A trained head set: one call to load it, a table and a plot of held-out R^2."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from heads.modules import ProjectionHead
from storage.artifacts import HEADS_KIND, is_kind
from storage.fs import as_path, check_location, writing
from storage.layout import StoreError

INDEX = "index.json"


@dataclass
class HeadSet:
    path: Path
    index: dict

    @property
    def mapping(self) -> dict[int, int]:
        """target layer -> source layer, as bridged."""
        return {int(k): v for k, v in self.index["inputs"]["layermap"].items()}

    @property
    def source(self) -> dict:
        return self.index["inputs"]["source"]

    @property
    def target(self) -> dict:
        return self.index["inputs"]["target"]

    def entries(self, direction=None, site=None, kind=None) -> list[dict]:
        return [h for h in self.index["heads"]
                if (direction is None or h["spec"]["direction"] == direction)
                and (site is None or h["spec"]["site"] == site)
                and (kind is None or h["spec"]["kind"] == kind)]

    def head(self, direction: str, target_layer: int, site: str, kind: str = "mlp", device="cpu") -> ProjectionHead:
        for h in self.entries(direction, site, kind):
            if h["spec"]["target_layer"] == target_layer:
                return ProjectionHead.load(self.path / h["name"], device=device)
        raise StoreError(f"{self.path}: no {kind} {direction} for site {site!r} at target layer {target_layer}")


def load_heads(path: str | Path) -> HeadSet:
    path = as_path(path)
    f = path / INDEX
    if not f.exists():
        check_location(path)
        raise StoreError(f"{path} is not a head set (no {INDEX}); make one with `cast train-heads`")
    index = json.loads(f.read_text())
    if not is_kind(index, HEADS_KIND):
        raise StoreError(f"{f} is not a CAST head index")
    return HeadSet(path=path, index=index)


def format_table(index: dict) -> str:
    rows = {}
    for h in index["heads"]:
        s, m = h["spec"], h["metrics"]
        key = (s["site"], s["target_layer"], s["source_layer"])
        rows.setdefault(key, {})[(s["direction"], s["kind"])] = (m["heldout"]["r2"], m["seconds"])
    cols = sorted({c for r in rows.values() for c in r})
    head = f"{'site':<10} {'T':>3} {'S':>3} " + " ".join(f"{d[:3]}/{k:<5} R2 (s)".rjust(18) for d, k in cols)
    lines = [head]
    for (site, t, s), r in sorted(rows.items()):
        cells = [f"{r[c][0]:>9.4f} ({r[c][1]:>5.1f})" if c in r else " " * 17 for c in cols]
        lines.append(f"{site:<10} {t:>3} {s:>3} " + " ".join(c.rjust(18) for c in cells))
    return "\n".join(lines)


def plot_r2(index: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({h["spec"]["site"] for h in index["heads"]})
    fig, axes = plt.subplots(1, len(sites), figsize=(6 * len(sites), 4), squeeze=False)
    for ax, site in zip(axes[0], sites):
        series = {}
        for h in index["heads"]:
            s = h["spec"]
            if s["site"] == site:
                series.setdefault((s["direction"], s["kind"]), []).append((s["target_layer"], h["metrics"]["heldout"]["r2"]))
        for (d, k), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if k == "mlp" else "x",
                    linestyle="-" if d == "encoder" else "--", label=f"{d} {k}")
        ax.set_title(f"held-out R² by bridged layer — {site}")
        ax.set_xlabel("target layer")
        ax.set_ylabel("R²")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with writing(png) as where:  # png may be on object storage: matplotlib writes locally
        fig.savefig(where, dpi=110)
    plt.close(fig)


def write_summary(index: dict, out: Path) -> str:
    """summary.md (the table) and r2_by_layer.png beside the head set; returns the table."""
    table = format_table(index)
    out = as_path(out)
    (out / "summary.md").write_text("Held-out R² (training seconds) per head\n\n```\n" + table + "\n```\n")
    plot_r2(index, out / "r2_by_layer.png")
    return table
