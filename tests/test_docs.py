"""Line links in the docs point at what they name.

A link such as ``[`rope_forward`](../ref_numpy/positional.py#L148)`` (or ``#L148-L160``) in
``docs/*.md`` or ``README.md`` must point into an existing file at the line where the named
definition starts: ``def rope_forward``, ``class X`` or ``X = ...`` (for ``Dense.weight``,
the ``def weight`` of class ``Dense``). A link whose text is not a name in backticks only
has to point at an existing line.

Code moves and links go stale; the failure message gives each correct line. To rewrite the
links in place (line numbers, and the path when a definition moved to another file)::

    python -m tests.test_docs --fix
"""

from __future__ import annotations

import ast
import os
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
SOURCES = ("ref_numpy", "jax_impl", "tests")  # where a moved definition is looked for

# [text](path#L12) or [text](path#L12-L20); the text holds no brackets, may span lines.
LINK = re.compile(
    r"\[(?P<text>[^\[\]]*)\]\((?P<path>[^()\s#]+)#L(?P<start>\d+)(?:-L(?P<end>\d+))?\)"
)
NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


@dataclass(frozen=True)
class Link:
    doc: Path
    doc_line: int  # 1-based line of the link in the doc
    text: str
    path: str  # as written, relative to the doc
    start: int
    end: int | None
    span: tuple[int, int]  # character offsets of the whole link in the doc

    @property
    def target(self) -> Path:
        return (self.doc.parent / self.path).resolve()

    @property
    def name(self) -> str | None:
        """The definition a code-formatted text names (``Dense.weight``), or None."""
        m = re.fullmatch(r"`([^`]+)`", self.text.strip())
        text = m.group(1).removesuffix("()") if m else ""
        return text if NAME.fullmatch(text) else None

    def where(self) -> str:
        doc = self.doc.relative_to(ROOT)
        return f"{doc}:{self.doc_line}: [{self.text}]({self.path}#L{self.start})"


def links(doc: Path) -> list[Link]:
    text = doc.read_text(encoding="utf-8")
    out = []
    for m in LINK.finditer(text):
        end = m.group("end")
        out.append(
            Link(
                doc=doc,
                doc_line=text.count("\n", 0, m.start()) + 1,
                text=m.group("text"),
                path=m.group("path"),
                start=int(m.group("start")),
                end=None if end is None else int(end),
                span=m.span(),
            )
        )
    return out


@cache
def definitions(path: Path) -> dict[str, list[int]]:
    """Qualified name (``Dense.weight``) -> the lines where a definition of it starts: every
    ``def`` / ``class`` line (after its decorators) and every assignment to a plain name, at
    module or class level."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: dict[str, list[int]] = {}

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                out.setdefault(prefix + node.name, []).append(node.lineno)
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            out.setdefault(prefix + n.id, []).append(node.lineno)
            elif isinstance(node, ast.If | ast.Try):  # definitions under a version check
                visit(node.body, prefix)

    visit(tree.body, "")
    return out


def definition_lines(path: Path, name: str) -> list[int]:
    """Lines of ``path`` where ``name`` (``f`` or ``Class.f``) is defined, at any nesting."""
    found: set[int] = set()
    for qual, lines in definitions(path).items():
        if qual == name or qual.endswith("." + name):
            found.update(lines)
    return sorted(found)


def moved_to(name: str) -> list[tuple[Path, int]]:
    """Every ``(file, line)`` of the project's sources where ``name`` is defined (only the
    module-level ones when there are any)."""
    paths = [p for package in SOURCES for p in sorted((ROOT / package).rglob("*.py"))]
    exact = [(p, line) for p in paths for line in definitions(p).get(name, [])]
    return exact or [(p, line) for p in paths for line in definition_lines(p, name)]


def problem(link: Link) -> tuple[str, str | None] | None:
    """What is wrong with ``link`` and the corrected ``path#Lnn`` (None if unknown), or None."""
    name = link.name
    if not link.target.is_file():
        if name is None:
            return f"{link.path} does not exist", None
        found = moved_to(name)
        hint = ", ".join(f"{p.relative_to(ROOT)}:{n}" for p, n in found) or "nowhere"
        fix = None
        if len(found) == 1:
            fix = f"{os.path.relpath(found[0][0], link.doc.parent)}#L{found[0][1]}"
        return f"{link.path} does not exist; {name} is defined at {hint}", fix
    n_lines = len(link.target.read_text(encoding="utf-8").splitlines())
    if link.end is not None and not link.start <= link.end <= n_lines:
        return f"range L{link.start}-L{link.end} is not within 1..{n_lines}", None
    if name is None:
        ok = 1 <= link.start <= n_lines
        return None if ok else (f"line {link.start} is past the end ({n_lines} lines)", None)
    lines = definition_lines(link.target, name)
    if link.start in lines:
        return None
    if not lines:
        return f"{name} is not defined in {link.path}", None
    exact = definitions(link.target).get(name, [])  # a module-level ``encode`` over a method
    best = lines if len(lines) == 1 else exact
    fix = f"{link.path}#L{best[0]}" if len(best) == 1 else None
    where = ", ".join(f"L{n}" for n in lines)
    return f"{name} is defined at {where} of {link.path}, not at L{link.start}", fix


ALL_LINKS = [link for doc in DOCS for link in links(doc)]


def test_docs_have_line_links() -> None:
    """The check below has something to check (a broken pattern would pass vacuously)."""
    assert len(ALL_LINKS) > 100
    assert sum(link.name is not None for link in ALL_LINKS) > 100


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_line_links_point_at_their_definitions(doc: Path) -> None:
    bad = [(link, problem(link)) for link in links(doc)]
    lines = [f"{link.where()}: {p[0]}" + (f" -> {p[1]}" if p[1] else "") for link, p in bad if p]
    assert not lines, "stale links (fix: python -m tests.test_docs --fix)\n" + "\n".join(lines)


def test_a_shifted_link_is_caught(tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    src = tmp_path / "m.py"
    src.write_text("X = 1\n\n\n@dec\nclass A:\n    def f(self):\n        pass\n")
    doc.write_text(
        "[`A`](../m.py#L5) [`A.f`](../m.py#L6) [`X`](../m.py#L1) [line](../m.py#L7)\n"
        "[`A`](../m.py#L4) [`f`](../m.py#L5)\n[`X`](../gone.py#L1) [line](../m.py#L8)\n"
        "[`A`](../m.py#L5-L9)\n"
    )
    got = [(link.doc_line, link.text, problem(link)) for link in links(doc)]
    assert [g[2] for g in got[:4]] == [None] * 4
    assert got[4][2] == ("A is defined at L5 of ../m.py, not at L4", "../m.py#L5")
    assert got[5][2] == ("f is defined at L6 of ../m.py, not at L5", "../m.py#L6")
    assert got[6][2] is not None and got[6][2][0].startswith("../gone.py does not exist")
    assert got[7][2] == ("line 8 is past the end (7 lines)", None)
    assert got[8][2] == ("range L5-L9 is not within 1..7", None)


def fix(doc: Path) -> int:
    """Rewrite the links of ``doc`` whose correct target is known; returns how many."""
    text = doc.read_text(encoding="utf-8")
    fixes = []
    for link in links(doc):
        p = problem(link)
        if p and p[1]:
            fixes.append((link, p[1]))
    for link, target in reversed(fixes):  # from the end, so earlier offsets stay valid
        start = int(target.rsplit("#L", 1)[1])
        end = "" if link.end is None else f"-L{link.end - link.start + start}"  # same length
        a, b = link.span
        text = text[:a] + f"[{link.text}]({target}{end})" + text[b:]
    doc.write_text(text, encoding="utf-8")
    return len(fixes)


if __name__ == "__main__":
    if sys.argv[1:] != ["--fix"]:
        sys.exit("usage: python -m tests.test_docs --fix")
    for doc in DOCS:
        if n := fix(doc):
            print(f"{doc.relative_to(ROOT)}: {n} links fixed")
    for link in (link for doc in DOCS for link in links(doc)):
        if (p := problem(link)) and not p[1]:
            print(f"{link.where()}: {p[0]} (fix by hand)")
