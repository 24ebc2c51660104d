"""What `cast bench` measures and how: its flags."""
from __future__ import annotations

from dataclasses import dataclass

PARTNERS = {"smollm2-135m": "gemma3-270m", "gemma3-270m": "smollm2-135m",
            "tiny-llama": "tiny-gemma3", "tiny-gemma3": "tiny-llama"}
PARTS = ("a", "b", "c", "d", "e", "f", "w", "g", "s", "h")


@dataclass
class BenchConfig:
    """What `cast bench` does; every field is a flag of the same name."""

    model: str = "smollm2-135m"
    """Model to benchmark (registry name, tiny preset or local HF directory)."""
    partner: str | None = None
    """Second model for (c), the head's target; default: the other model of the real pair
    (tiny-llama <-> tiny-gemma3), else the model itself."""
    corpus: str = "nlp-corpus"
    """Built-in corpus name, or a file/directory/glob of .txt/.jsonl/.parquet."""
    tokens: int = 8192
    """N: tokens in the plan every method runs over (whole segments, as `cast extract`)."""
    unit_tokens: int = 4096
    """Tokens per unit (commit grain), `cast extract`'s default. Each unit has a write cost
    (one file per layer and site, ~0.2 CPU-s per 400 MB) and the last unit's write cannot
    overlap a forward pass, so small N or small units understate extraction."""
    batch_tokens: int = 4096
    """Padded tokens per forward pass, for every method alike."""
    max_chars: int = 512
    """Segment length in characters."""
    sites: str = "resid,attn_in,mlp_in"
    """Sites extracted (and dumped by the naive path)."""
    layers: str = "all"
    """Layers extracted: 'all', '0-5', '3,7,11', '-1'."""
    dtype: str = "bfloat16"
    """Storage dtype of the extraction."""
    naive_dtype: str = "float32"
    """dtype the naive path saves with np.save: float32 (what HF hands out) or float16."""
    reps: int = 3
    """Interleaved repetitions of every timed method; medians are reported."""
    parts: str = "a,b,c,d,e,f,w,g,s,h"
    """Which measurements to run (a,b share their timed runs; e and f read the store a made)."""
    both: bool = True
    """(a): also time extract, forward and backbone of --partner, so one run gives
    extract / backbone for both models of the pair."""
    breakdown: bool = True
    """(a): also time extraction in layers, to show where its cost over the backbone goes:
    `hooks` (every hook fires, values discarded) and `extract_no_write` (hooks, gather, bf16
    encode, stats; the unit is dropped instead of written)."""
    ray: bool = False
    """Also time the Ray path: one extraction actor (model loaded once) fed the same units."""
    head_site: str = "attn_in"
    """(c): site of the head (must be among --sites)."""
    head_kind: str = "mlp"
    """(c): head kind, mlp or ridge (as `cast train-heads`)."""
    head_depth: float = 0.5
    """(c): relative depth of the head's layers in both models (0 first layer, 1 last);
    the recompute path forwards each model only down to that layer."""
    head_threads: int = 1
    """(c): torch threads for both paths of the head epoch; 1 is how `cast train-heads`
    runs each head (one Ray task, one thread); 0 keeps torch's default."""
    mem_tokens: int = 2048
    """(d): N for the memory runs (4N is the other)."""
    mem_unit_tokens: int = 1024
    """(d): unit size of the memory runs. Memory is bounded by the unit (at most two in
    memory: one being filled, one being written), so N should span >= 2 units."""
    proxy_source: str = "smollm2-135m"
    """(g): the proxy's source model (a random LoRA of rank 8 on q_proj,v_proj stands in for the adapter)."""
    proxy_target: str = "gemma3-270m"
    """(g): the proxy's target model."""
    proxy_lengths: str = "32,128,512"
    """(g): total text lengths (prompt + generated, target tokens) at which the per-token time is taken."""
    student_target: str = "gemma3-270m"
    """(s): the model a `cast distill` student is trained on; (h): the model whose LM head is timed."""
    student_continuation: int = 2
    """(s): longest continuation sampled per prefix, in tokens (zero-data teacher samples average about 1.5)."""
    threads: int = 0
    """torch threads (0: torch's default, one per core)."""
    workdir: str | None = None
    """Scratch directory for stores and dumps; default a temp dir, removed afterwards."""
    keep: bool = False
    """Keep the scratch directory."""
    json: str | None = None
    """Where to write the JSON result; default runs/bench/<model>.json (a .md table beside it)."""

    def __post_init__(self):
        bad = [p for p in self.parts.split(",") if p.strip() not in PARTS]
        if bad:
            raise ValueError(f"--parts: unknown {bad}; choose from {','.join(PARTS)}")
        for part, what in (("e", "bytes per token"), ("f", "integrity cost")):
            if part in self.part_set and "a" not in self.part_set:
                raise ValueError(f"--parts: {part} ({what}) measures the store made by a; add a")
        for name in ("tokens", "unit_tokens", "batch_tokens", "reps", "mem_tokens", "mem_unit_tokens",
                     "student_continuation"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.naive_dtype not in ("float32", "float16"):
            raise ValueError(f"--naive-dtype {self.naive_dtype!r}: choose float32 or float16")
        if not 0.0 <= self.head_depth <= 1.0:
            raise ValueError(f"--head-depth must be in [0, 1], got {self.head_depth}")
        if "c" in self.part_set and self.head_site not in [s.strip() for s in self.sites.split(",")]:
            raise ValueError(f"--head-site {self.head_site} is not among --sites {self.sites}")

    @property
    def partner_name(self) -> str:
        return self.partner or PARTNERS.get(self.model, self.model)

    @property
    def part_set(self) -> set[str]:
        return {p.strip() for p in self.parts.split(",") if p.strip()}

