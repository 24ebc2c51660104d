"""The tree keeps its shape: no import cycle among modules or among top-level packages,
no module over 400 lines outside tests/, and nothing that points outside the repo.

Imports are read from the source (ast), function-level ones included: an import inside
a function is still a dependency, only a later one.
"""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
SKIP = {"tests", "docs", "build", "infra"}


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [ROOT / f for f in out.splitlines() if (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked sdist)
        return [p for p in ROOT.rglob("*") if p.is_file() and not any(s.startswith(".") for s in
                                                                        p.relative_to(ROOT).parts)]


def modules() -> dict[str, Path]:
    """Dotted name -> file of every project module outside tests/."""
    found = {}
    for path in tracked_files():
        rel = path.relative_to(ROOT)
        if path.suffix != ".py" or rel.parts[0] in SKIP or len(rel.parts) < 2:
            continue
        found[".".join(rel.with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, each resolved to the deepest known module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]  # a submodule, else an attribute of base
        else:
            continue
        out |= {t for t in map(resolve, targets) if t and t != name}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def module_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_import_cycle_among_modules():
    found = cycles(module_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_cycle_among_top_level_packages():
    packages: dict[str, set[str]] = {}
    for name, deps in module_graph().items():
        top = name.split(".")[0]
        packages.setdefault(top, set()).update(d.split(".")[0] for d in deps if d.split(".")[0] != top)
    found = cycles(packages)
    assert not found, "packages that import each other: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_over_the_line_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    over = sorted(f"{n} ({k} lines)" for n, k in sizes.items() if k > MAX_LINES)
    assert not over, f"modules over {MAX_LINES} lines: {', '.join(over)}"
    assert len(sizes) > 40  # the walk found the project


def test_the_checks_catch_what_they_are_for():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = module_graph()
    assert "storage.layout" in graph["storage.reader"]       # plain `from x.y import z`
    assert "pipeline.cache.models" in graph["pipeline.cache.extract"]
    assert "runtime.cluster" in graph["runtime.work"]        # an import inside a function counts


OUTSIDE = re.compile(r"\.\./shared|DESIGN\.md|DESIGN §|\bissue \d+")
DOC_LINK = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")


def anchors(md: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    out = set()
    for line in md.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_nothing_points_outside_the_repo_and_doc_links_resolve():
    bad, dead = [], []
    for path in tracked_files():
        rel = path.relative_to(ROOT)
        if rel.suffix not in (".py", ".md", ".toml", ".yaml", ".yml", ".txt", "") or rel.parts[0] == ".git":
            continue
        if rel == Path("tests/test_layout.py"):
            continue
        text = path.read_text(errors="replace")
        bad += [f"{rel}: {m.group(0)!r}" for m in OUTSIDE.finditer(text)]
        for m in DOC_LINK.finditer(text):
            doc = ROOT / "docs" / m.group(1)
            if not doc.exists() or (m.group(2) and m.group(2) not in anchors(doc)):
                dead.append(f"{rel}: {m.group(0)}")
    assert not bad, "references a user of this repo cannot open: " + ", ".join(bad)
    assert not dead, "links into docs/ that lead nowhere: " + ", ".join(dead)
