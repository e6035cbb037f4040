"""Every relative link and image in the Markdown documentation resolves, and README.md stays short.

Reads files only: it imports nothing from sigec.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); target may be <...> and may carry a "title"
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?\s(?:src|href)=\"([^\"]+)\"", re.I)
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def markdown_files(root: Path = ROOT) -> list[Path]:
    files = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    files += [p for p in (root / "passes" / "README.md", root / "csrc" / "README.md") if p.exists()]
    return [p for p in files if p.exists()]


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced and indented code blocks, with code spans blanked."""
    out, fenced, prev_blank = [], False, True
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            prev_blank = False
            continue
        if fenced:
            continue
        if prev_blank and line.startswith("    ") and not line.lstrip().startswith(("*", "-", "+")):
            continue  # an indented code block (a list item's continuation lines do not follow a blank)
        prev_blank = not line.strip()
        out.append((number, _CODE_SPAN.sub("", line)))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """Every link and image target in a Markdown file: (line number, target)."""
    found = []
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        for pattern in (_INLINE, _REFERENCE, _HTML_SRC):
            for m in pattern.finditer(line):
                found.append((number, m.group(1).strip("<>")))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation other than '-' and
    '_' dropped, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    result = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def broken_links(path: Path) -> list[str]:
    """A message for every relative link of ``path`` whose file or heading does not exist."""
    problems = []
    for number, target in links(path):
        if _EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}"
        if not resolved.exists():
            problems.append(f"{where}: {target!r}: no file {resolved}")
            continue
        if anchor and resolved.suffix.lower() == ".md" and anchor.lower() not in anchors(resolved):
            problems.append(f"{where}: {target!r}: no heading with anchor #{anchor} in {resolved.name}")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_docs_exist_and_are_linked_from_readme() -> None:
    readme_targets = {t.partition("#")[0] for _, t in links(ROOT / "README.md")}
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme_targets, f"docs/{page.name} is not linked from README.md"


def test_slug_follows_github() -> None:
    assert slug("`sigec.compile` and the engine") == "sigeccompile-and-the-engine"
    assert slug("Where the time goes: church-256, 30% edit") == "where-the-time-goes-church-256-30-edit"
    assert slug("Editing with Stable Diffusion: `sigec.diffusion`") == "editing-with-stable-diffusion-sigecdiffusion"
    assert slug("GPU: one NVIDIA H100") == "gpu-one-nvidia-h100"


def test_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "![ok](img.png) [ok](other.md) [ok](other.md#a-section) [ok](other.md#a-section-1) [ok](#page)\n"
        "[web](https://example.com/missing.md) [mail](mailto:someone@example.com)\n"
        "`[not a link](missing-in-code.md)`\n\n"
        "```\n[not a link](missing-in-fence.md)\n```\n\n"
        "![broken](missing.png)\n"
        "[broken](other.md#no-such-heading)\n"
        "[broken](#nowhere)\n"
        "[ref]: ../missing-ref.md\n")
    problems = broken_links(page)
    assert len(problems) == 4, problems
    for needle in ("missing.png", "#no-such-heading", "#nowhere", "missing-ref.md"):
        assert any(needle in p for p in problems), (needle, problems)
