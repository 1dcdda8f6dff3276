"""The docs stay true and readable: README's commands parse, every doc is reachable from docs/index.md,
links point at files that exist, README stays short, and no file speaks of work sessions by number."""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from core.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 6144

# The word followed by a number ("9", "13–15", "-7", "one"), any case: lab-notebook talk that means nothing
# to a user. A browser, Streamlit, ONNX Runtime or test session is a real word; a numbered one is not.
SESSION_NUMBER = re.compile(
    r"\bsessions?[ \t\-–—]*(?:\d|(?:one|two|three|four|five|six|seven|eight|nine|ten)\b)", re.IGNORECASE)


def session_numbers(text: str) -> list[str]:
    """The lines of `text` that name a session by number, as 'line N: text'."""
    return [f"line {i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
            if SESSION_NUMBER.search(line)]


def repo_files() -> list[Path]:
    """Tracked files, and new ones not ignored (a file about to be committed is checked too)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of the repository's files")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_session_pattern():
    s = "sess" + "ion"   # spelled apart so that this file passes its own check
    for bad in (f"{s} 9", f"{s.title()} 7: results", f"{s}s 13–15", f"{s}s 7 and 13", f"the {s}-7 protocol",
                f"({s} 13, AMD EPYC)", f"{s}s 10-11", f"{s} one"):
        assert session_numbers(bad), bad
    for fine in (f"a browser {s}", f"one {s} per model", f"the Streamlit {s}'s state",
                 f"pytest's {s} fixture", f"ONNX Runtime {s}s run convolutions", f"{s}_state"):
        assert not session_numbers(fine), fine


def test_no_session_numbers_anywhere():
    found = []
    for path in repo_files():
        try:
            data = path.read_bytes()
        except OSError:   # deleted in the working tree, or not a file
            continue
        if b"\0" in data[:8192]:
            continue   # binary (screenshots)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(ROOT)} {hit}" for hit in session_numbers(text)]
    assert not found, ("date a measurement, or name its commit or CPU; never a work session:\n"
                       + "\n".join(found))


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes (at most {README_MAX_BYTES}): move detail to docs/"


# ---- README's commands ----

_COMMAND = re.compile(r"python -m core\b([^`\n#|]*)")


def shown_commands(markdown: str) -> list[list[str]]:
    """The argument lists of every `python -m core ...` in code (fenced blocks, inline code, tables)."""
    fenced = re.findall(r"```.*?```", markdown, flags=re.S)
    prose = re.sub(r"```.*?```", "", markdown, flags=re.S)
    code = fenced + re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose)
    commands = []
    for snippet in code:
        for m in _COMMAND.finditer(snippet):
            argv = shlex.split(m.group(1).replace("\\\n", " "))
            if argv:   # a bare `python -m core` names the program, it shows no command
                commands.append(argv)
    return commands


def _strict_parser():
    """The CLI's parser, without argparse's abbreviations: `sweep --dataset` must not pass for `--datasets`."""
    parser = build_parser()
    todo = [parser]
    while todo:
        p = todo.pop()
        p.allow_abbrev = False
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += list(action.choices.values())
    return parser


def _run_parser(argv: list[str]) -> tuple[int, str]:
    """Parse argv as `python -m core` would; (exit code, stderr). Nothing is run."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            _strict_parser().parse_args(argv)
        except SystemExit as exc:
            return (exc.code if isinstance(exc.code, int) else 1), err.getvalue()
    return 0, err.getvalue()


def command_problems(argv: list[str]) -> list[str]:
    """Why `python -m core <argv>` as shown would not work (an empty list when it parses)."""
    if argv[0].startswith("<"):   # `python -m core <command> --help`: every subcommand
        subcommands = next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        return [p for sub in subcommands for p in command_problems([sub, *argv[1:]])]
    problems = []
    code, err = _run_parser(argv)
    if code != 0:
        problems.append(f"`python -m core {shlex.join(argv)}` exits {code}: {err.strip()}")
    code, err = _run_parser([argv[0], "--help"])
    if code != 0:
        problems.append(f"`python -m core {argv[0]} --help` exits {code}: {err.strip()}")
    return problems


def test_readme_commands_parse():
    commands = shown_commands(README.read_text())
    assert len(commands) >= 6, "README shows the command line"
    shown = {argv[0] for argv in commands if argv}
    assert {"info", "train", "compress", "sweep"} <= shown
    problems = [p for argv in commands for p in command_problems(argv)]
    assert not problems, "\n".join(problems)


def test_command_check_catches_what_does_not_exist():
    fake = ("| `python -m core compress --technique prune --no-such-flag 3` | x |\n"
            "```bash\npython -m core info --dataset cifar10    # info takes no --dataset\n"
            "python -m core nosuchcommand\npython -m core sweep --dataset shapes\n```\n")
    commands = shown_commands(fake)
    assert len(commands) == 4
    for argv in commands:
        assert command_problems(argv), argv
    good = shown_commands("`python -m core sweep --datasets shapes` and `python -m core <command> --help`")
    assert [p for argv in good for p in command_problems(argv)] == []


# ---- links ----

def relative_links(markdown: str) -> list[str]:
    """Targets of Markdown links and images that are not URLs or in-page anchors (HTML comments skipped)."""
    markdown = re.sub(r"<!--.*?-->", "", markdown, flags=re.S)
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", markdown)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")]


def missing_links(md_file: Path) -> list[str]:
    return [t for t in relative_links(md_file.read_text())
            if not (md_file.parent / t.split("#", 1)[0]).exists()]


def test_links_check_catches_a_missing_file(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("x")
    page.write_text("[a](there.md) [b](there.md#part) [c](missing.md) ![d](img/nope.png) "
                    "[e](https://example.org) [f](#anchor) <!-- [g](commented.md) -->")
    assert missing_links(page) == ["missing.md", "img/nope.png"]


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_relative_links_exist(page):
    assert not missing_links(ROOT / page), f"{page} links to files that do not exist"


def test_every_doc_is_in_the_index():
    linked = {(DOCS / t.split("#", 1)[0]).resolve() for t in relative_links((DOCS / "index.md").read_text())}
    pages = {p.resolve() for p in DOCS.glob("*.md") if p.name != "index.md"}
    unlisted = sorted(p.name for p in pages - linked)
    assert not unlisted, f"add a line for each to docs/index.md: {unlisted}"
    assert README.resolve() in linked, "docs/index.md points back at the README"
    assert "docs/index.md" in relative_links(README.read_text()), "README points at docs/index.md"
