"""The Python examples in README.md and docs/ run as a user would run them, and every page's code fences are well
formed (an unclosed fence, or text after a closing one, turns the rest of a page into code in CommonMark).

Each Python block runs alone, in a fresh namespace and an empty folder, unless its first line says that it continues
the block above (``# continues the example above``): then it runs after the blocks it continues, as a reader who
followed the page would run it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: The first line of a block that runs after the one above it.
CONTINUES = "# continues the example above"


def fences(text: str) -> list[tuple[int, str, str]]:
    """The fenced blocks of a page: ``(line of the opening fence, language, code)``; a malformed fence fails."""
    blocks, opened, lines = [], None, text.splitlines()
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped.startswith("```"):
            continue
        if opened is None:
            opened = (number, stripped[3:].strip(), [])
            continue
        assert stripped == "```", f"line {number}: a closing fence with text after it: {line!r}"
        blocks.append((opened[0], opened[1], "\n".join(lines[opened[0]:number - 1]) + "\n"))
        opened = None
    assert opened is None, f"line {opened[0]}: a fence that is never closed"
    return blocks


def python_examples() -> list[tuple[Path, int, list[str]]]:
    """Each Python block with the code it runs: its own, after that of the blocks it continues."""
    examples = []
    for path in DOCS:
        chain: list[str] = []
        try:
            blocks = fences(path.read_text(encoding="utf-8"))
        except AssertionError:  # test_code_fences_are_well_formed names it
            continue
        for line, language, code in blocks:
            if language != "python":
                continue
            chain = [*chain, code] if code.startswith(CONTINUES) else [code]
            examples.append((path, line, chain))
    return examples


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_code_fences_are_well_formed(path):
    fences(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path, line, chain", python_examples(),
                         ids=[f"{p.name}:{line}" for p, line, _ in python_examples()])
def test_a_python_example_runs_as_written(path, line, chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"doc_{path.stem}"}
    for n, code in enumerate(chain):
        exec(compile(code, f"{path.name}:{line} (block {n + 1} of {len(chain)})", "exec"), namespace)


def test_the_fence_check_finds_what_commonmark_would_misread():
    with pytest.raises(AssertionError, match="a closing fence with text after it"):
        fences("```python\nx = 1\n``` It returns\n")
    with pytest.raises(AssertionError, match="never closed"):
        fences("```bash\nls\n")


def test_every_doc_page_that_the_code_names_exists():
    named = {m for path in [*(ROOT / "fusionkit").rglob("*.py"), *(ROOT / "plugins").glob("*/*/*.py")]
             for m in re.findall(r"docs/[\w-]+\.md", path.read_text())}
    assert named and not [page for page in named if not (ROOT / page).is_file()]
