"""Every code block in README.md and docs/ runs, or names commands that exist.

A fence's language says how it is checked:

* ``python``: the page's python blocks run in order, as one script, in a fresh process in an empty
  directory (what a reader who pastes them gets); a block may use what an earlier one defined.
* ``py``: code that needs ``torchrun``; its body must include a file of ``examples/`` by the snippets
  syntax (``--8<-- "examples/NAME.py"``), and a test must run that file.
* ``bash``: shell commands; each one's program must exist (``make`` targets in the Makefile,
  ``pergrad`` subcommands and every option they use in that subcommand's ``--help``, other programs
  in the test environment).
* ``text``: output or a formula, not run.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
LANGUAGES = {"python", "py", "bash", "text"}
_FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
# pages whose python blocks train or build a model for ten seconds or more on two cores
_SLOW = {"README.md", "docs/frameworks.md", "docs/your-model.md", "docs/statistics.md"}


def _blocks(page: Path) -> list[tuple[str, str]]:
    """(language, body) of every fenced block of ``page``, in order."""
    return [(info.split()[0] if info.strip() else "", body) for info, body in _FENCE.findall(page.read_text())]


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def test_every_block_has_a_known_language():
    for page in PAGES:
        for language, body in _blocks(page):
            assert language in LANGUAGES, f"{_name(page)}: a block fenced as {language!r}: {body[:80]!r}"


def test_indented_code_blocks_are_not_used():
    """A block indented by four spaces would escape these checks: fence it instead."""
    for page in PAGES:
        outside = _FENCE.sub("", page.read_text())
        prose_then_indented = re.search(r"\n\n( {4}\S[^\n]*)", outside)
        assert prose_then_indented is None, f"{_name(page)}: indented code block {prose_then_indented.group(1)!r}"


_PYTHON_PAGES = [p for p in PAGES if any(lang == "python" for lang, _ in _blocks(p))]


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, id=_name(p), marks=[pytest.mark.slow] if _name(p) in _SLOW else []) for p in _PYTHON_PAGES],
)
def test_python_blocks_run(page, tmp_path):
    script = "\n\n".join(body for language, body in _blocks(page) if language == "python")
    (tmp_path / "page.py").write_text(script)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "page.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{_name(page)}:\n{done.stderr[-4000:]}"


def test_torchrun_blocks_include_an_example_that_a_test_runs():
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    seen = 0
    for page in PAGES:
        for language, body in _blocks(page):
            if language != "py":
                continue
            included = re.fullmatch(r'--8<-- "(examples/[\w./-]+\.py)"\s*', body)
            assert included, f"{_name(page)}: a py block must include an example file: {body[:80]!r}"
            path = ROOT / included.group(1)
            assert path.is_file(), f"{_name(page)}: {path} does not exist"
            assert path.name in tests, f"{_name(page)}: no test runs {path.name}"
            seen += 1
    assert seen >= 1


def _commands(body: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, env assignments skipped."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words = words[1:]
        if words:
            out.append(words)
    return out


def _pergrad_help(subcommand: str) -> str:
    from pergrad.cli.main import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser().parse_args([subcommand, "--help"])
    return out.getvalue()


def _check_pergrad(words: list[str], where: str) -> None:
    assert len(words) >= 2, f"{where}: `pergrad` without a subcommand"
    if words[1] == "--help":
        return
    text = _pergrad_help(words[1])
    assert text.startswith(f"usage: pergrad {words[1]}"), f"{where}: no subcommand `pergrad {words[1]}`"
    for word in words[2:]:
        option = word.split("=")[0]
        if option.startswith("--"):
            assert re.search(rf"{re.escape(option)}\b", text), f"{where}: `pergrad {words[1]}` has no {option}"


def _targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def test_shell_blocks_name_commands_that_exist():
    bin_dir = Path(sys.executable).parent
    targets = _targets()
    checked = 0
    for page in PAGES:
        for language, body in _blocks(page):
            if language != "bash":
                continue
            for words in _commands(body):
                where = f"{_name(page)}: {' '.join(words)}"
                program = words[0]
                if program == "make":
                    assert words[1] in targets, f"{where}: no make target {words[1]}"
                elif program == "pergrad":
                    _check_pergrad(words, where)
                elif program == "torchrun" and "-m" in words and words[words.index("-m") + 1] == "pergrad":
                    _check_pergrad(words[words.index("-m") + 1 :], where)
                else:
                    found = (bin_dir / program).exists() or shutil.which(program) is not None
                    assert found, f"{where}: {program} is not installed"
                checked += 1
    assert checked > 20


def test_readme_is_short_and_links_into_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), f"README links to a missing page: {link}"
