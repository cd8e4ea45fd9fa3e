"""The repository stands on its own: no file points outside it, and the docs the code cites exist.

A clone holds only the repository, so documentation lives in `docs/` and code cites it as
`docs/method.md §N` / `docs/formats.md §N`; these tests fail on a reference to a folder beside the
checkout or on a citation of a section (or page, or link target) that does not exist.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Spelled in pieces so that this file does not match its own patterns.
OUTSIDE = "sha" + "red"
FORBIDDEN = [
    re.compile(r"\.\./" + OUTSIDE + r"\b"),  # a path to the folder beside the checkout
    re.compile(OUTSIDE + r"/design\b"),  # the team's design notes (now docs/)
    re.compile(r"""["']""" + OUTSIDE + r"""["']\s*/"""),  # the same folder joined as a pathlib path
]
# Test code that may look for optional data beside the checkout (it skips when the data is absent).
ALLOWED = {"tests/conftest.py"}
# `docs/X.md §N` anywhere; inside docs/ pages also cite each other as `X.md §N`.
CITATION = re.compile(r"(?<![\w.-])(?:docs/)?([\w-]+\.md)((?:\s*(?:,|–|-|and)?\s*§\d+)+)")
BARE_CITATION = re.compile(r"(?<![\w/.-])(method|formats)\.md\b")
SECTION = re.compile(r"^## (\d+)\. ", re.MULTILINE)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def tracked_files() -> list[Path]:
    """Files under version control (every file but .git/ and virtualenvs outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not skip.intersection(p.relative_to(ROOT).parts)]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def text_files() -> dict[str, str]:
    """Repository-relative path -> text of every tracked UTF-8 file."""
    texts = {}
    for path in tracked_files():
        try:
            texts[path.relative_to(ROOT).as_posix()] = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files cite nothing
    return texts


def sections(page: str) -> set[int]:
    """Numbers N of the `## N. Title` headings of docs/<page>."""
    return {int(n) for n in SECTION.findall((DOCS / page).read_text(encoding="utf-8"))}


def cited_sections(spec: str) -> set[int]:
    """"§2, §3, §5" -> {2, 3, 5}; "§1–§3" -> {1, 2, 3}."""
    numbers = [int(n) for n in re.findall(r"\d+", spec)]
    cited = set(numbers)
    for m in re.finditer(r"§(\d+)\s*[–-]\s*§?(\d+)", spec):
        cited.update(range(int(m.group(1)), int(m.group(2)) + 1))
    return cited


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_no_reference_outside_the_repository() -> None:
    hits = [
        f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
        for name, text in text_files().items()
        if name not in ALLOWED
        for pattern in FORBIDDEN
        for m in pattern.finditer(text)
    ]
    assert not hits, "files refer to a folder outside the repository; cite docs/ instead:\n" + "\n".join(hits)


def test_cited_doc_sections_exist() -> None:
    citations = 0
    missing = []
    for name, text in text_files().items():
        for m in CITATION.finditer(text):
            page, spec = m.group(1), m.group(2)
            citations += 1
            if not (DOCS / page).is_file():
                missing.append(f"{name}: docs/{page} does not exist")
                continue
            absent = sorted(cited_sections(spec) - sections(page))
            if absent:
                missing.append(f"{name}: docs/{page} has no section {', '.join(f'§{n}' for n in absent)}")
    assert citations >= 10, "the citation pattern no longer matches the code's `docs/method.md §N` citations"
    assert not missing, "\n".join(missing)


def test_code_cites_docs_by_repository_path() -> None:
    """Outside docs/, a page is cited as `docs/method.md`, which a reader of the code can open."""
    bare = [
        f"{name}:{text.count(chr(10), 0, m.start()) + 1}"
        for name, text in text_files().items()
        if not name.startswith("docs/")
        for m in BARE_CITATION.finditer(text)
    ]
    assert not bare, "cite docs pages as docs/<page>.md §N:\n" + "\n".join(bare)


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_doc_links_resolve(page: str) -> None:
    """Relative links of a docs page point at existing files, and their #anchors at headings."""
    broken = []
    for target in LINK.findall((DOCS / page).read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked (no network in tests)
        file, _, anchor = target.partition("#")
        path = (DOCS / file).resolve() if file else DOCS / page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
            if anchor not in {github_anchor(h) for h in headings}:
                broken.append(target)
    assert not broken, f"docs/{page}: broken links {broken}"


def test_section_numbers_are_consecutive() -> None:
    """Sections are numbered 1..N once each, so a citation cannot land on a duplicate."""
    numbered = 0
    for page in sorted(DOCS.glob("*.md")):
        numbers = [int(n) for n in SECTION.findall(page.read_text(encoding="utf-8"))]
        numbered += bool(numbers)
        assert numbers == list(range(1, len(numbers) + 1)), (page.name, numbers)
    assert numbered >= 2  # method and formats


LIBRARY = ("chtsl_infer", "train", "export", "evals")


def import_graph() -> dict[str, set[str]]:
    """Library module -> the library modules it imports (at any depth of its code, type-only imports
    included: a circle of annotations is still a circle a reader has to untangle)."""
    import ast

    modules = {}
    for package in LIBRARY:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            # `from pkg import module` names the module; `from module import name` the module itself.
            graph[name].update(next(([t] for t in targets if t in modules), []))
    return graph


def test_the_library_has_no_import_circle() -> None:
    """Modules form a DAG (docs/contributing.md): Tarjan's strongly connected components of size > 1."""
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                circles.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    assert len(graph) > 50 and not circles, circles
