"""The docs against the code (issue 22): the README's command-line contract names every command and option the
CLI has, and nothing it lacks; every repository path that README.md, BENCHMARKS.md and docs/ name exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fusion_seg.cli import main

ROOT = Path(__file__).resolve().parents[1]
# Paths the docs name that a command writes, not the repository: each with what makes it.
WRITTEN = {"benchmarks/bench-cuda.json": "make gpu-check (benchmarks/gpu_check.sh)"}
TOP = ("fusion_seg/", "tests/", "benchmarks/", "pipelines/", "docs/", ".ci/")


def contract() -> dict[str, set[str]]:
    """``{command: options}`` from the README's contract: the code block that follows "The full command-line
    contract", one entry a ``fusion-seg COMMAND`` line and the indented lines under it (a command listed twice,
    as train-decoder is, has the options of both)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("The full command-line contract")
    block = text[text.index("```", start) + 3:]
    block = block[block.index("\n") + 1:block.index("```")]
    entries: dict[str, set[str]] = {}
    command = None
    for line in block.splitlines():
        if line.startswith("fusion-seg "):
            command = line.split()[1]
        elif not line.startswith(" "):
            command = None  # torchrun's line: the same command, no options of its own
        if command:
            entries.setdefault(command, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
    return entries


def cli_options(command) -> set[str]:
    return {o for p in command.params for o in p.opts if o.startswith("--") and o != "--help"}


def test_the_readme_contract_has_every_command_and_option_and_nothing_else():
    documented = contract()
    assert set(documented) == set(main.commands), (sorted(documented), sorted(main.commands))
    for name, command in main.commands.items():
        real = cli_options(command)
        assert documented[name] - real == set(), f"README documents options {name} lacks"
        assert real - documented[name] == set(), f"{name} has options the README's contract omits"


def named_paths(text: str) -> set[str]:
    """Repository paths in backquotes: under a top-level folder of the repository, or one of its top files."""
    paths = set()
    for token in re.findall(r"`([^`\s]+)`", text):
        path = token.split("::")[0].rstrip(".,:;)")
        if path.startswith(TOP) or path in ("Makefile", "pyproject.toml", "constraints.txt", "README.md",
                                            "BENCHMARKS.md"):
            if not re.search(r"[*{}<>]|NAME|\.\.\.", path):  # a pattern, not a path
                paths.add(path)
    return paths


@pytest.mark.parametrize("doc", ["README.md", "BENCHMARKS.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_every_path_the_docs_name_exists(doc):
    missing = sorted(p for p in named_paths((ROOT / doc).read_text()) if p not in WRITTEN and not (ROOT / p).exists())
    assert missing == [], f"{doc} names paths that do not exist: {missing}"


def test_the_checks_can_fail():
    """The parsers find what they look for: a contract line's options, and a missing path."""
    assert contract()["run"] == {"--set", "--epoch-scale", "--dry-run"}
    assert named_paths("see `fusion_seg/nosuch.py` and `tests/x.py::test_y`, not `fusion_seg/*.py`") == {
        "fusion_seg/nosuch.py", "tests/x.py"}


def test_the_reading_of_the_bench_quotes_its_block():
    """Issue 22: BENCHMARKS' reading of `make bench` quotes the block above it, not an older run: each figure it
    marks as the block's (in bold) stands in the block. A new block whose figures differ fails this until the
    reading is rewritten."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    block = text[text.index("<!-- fusion-seg bench: begin cpu -->"):text.index("<!-- fusion-seg bench: end -->")]
    reading = text[text.index("<!-- reading of the bench block: begin -->"):
                   text.index("<!-- reading of the bench block: end -->")]
    quoted = re.findall(r"\*\*(\d+(?:\.\d+)?x?)\*\*", reading)
    assert len(quoted) >= 10, quoted
    missing = [q for q in quoted if not re.search(rf"(?<![\d.]){re.escape(q)}(?![\d])", block)]
    assert missing == [], f"the reading quotes figures its block does not hold: {missing}"
