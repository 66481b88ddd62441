"""The README's and docs' shell commands work as pasted into a fresh shell in the project folder.

Every fenced ``bash``/``sh`` block of README.md and docs/*.md is split into simple commands, and each one's
program must exist where the command runs: a ``make`` target in the Makefile; ``.venv/bin/X`` in the
environment ``make setup`` builds (here: this interpreter's bin folder), with ``python -m M`` importable, a
script that exists and ``vpr SUB`` a real command; a shell builtin; or a program of the system itself
(found on PATH without any virtualenv: a bare ``prefect`` or ``dvc`` lives only in ``.venv/bin``, so a
fresh shell answers "command not found").
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from tests.flowkit import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELLS = {"bash", "sh", "shell", "console"}
BUILTINS = {"export", "cd", ".", "source", "kill", "wait", "echo", "set", "unset", "exec", "true"}
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}
VENV_BIN = Path(sys.executable).parent  # what `make setup` builds as .venv/bin


def shell_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each fenced shell block; nested fences (in lists) count too."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        match = re.match(r"\s*```(\w*)\s*$", lines[i])
        if match:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not re.match(r"\s*```\s*$", lines[i]):
                body.append(lines[i])
                i += 1
            if match.group(1) in SHELLS:
                blocks.append((start + 1, "\n".join(body)))
        i += 1
    return blocks


def simple_commands(block: str) -> list[list[str]]:
    """The block's simple commands as word lists (comments dropped, ``\\`` continuations joined)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in lexer:
            if token in OPERATORS:
                commands.append(words)
                words = []
            else:
                words.append(token)
        commands.append(words)
    return [words for words in commands if words]


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+):(?!=)", (REPO / "Makefile").read_text(), re.M))


def vpr_commands() -> set[str]:
    import typer

    from vpr.cli import app

    return set(typer.main.get_command(app).commands)


def system_program(name: str) -> str | None:
    """``name`` on PATH outside every virtualenv (what a fresh shell finds)."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "activate").exists()]
    return shutil.which(name, path=os.pathsep.join(dirs))


def problem(words: list[str], activated: bool) -> str | None:
    """Why this command would not run as written in a fresh shell in the project folder (None: it would)."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    program, args = words[0], words[1:]
    if program == "make":
        targets = [a for a in args if not a.startswith("-") and "=" not in a]
        missing = [t for t in targets if t not in make_targets()]
        return f"no make target {missing}" if missing else None
    if program in BUILTINS:
        if program in {".", "source"} and args and not args[0].startswith(".venv/bin/"):
            return f"sources {args[0]}, not the project's .venv"
        return None
    if program.startswith(".venv/bin/"):
        name = program.removeprefix(".venv/bin/")
    elif activated and (VENV_BIN / program).exists():
        name = program
    elif "/" in program:
        return None if (REPO / program).exists() else f"{program} does not exist in the project"
    elif program.startswith("python"):  # the system's python has none of the project's packages
        return f"`{program}` is the system's interpreter, without the project's packages (use .venv/bin/{program})"
    else:
        return None if system_program(program) else f"`{program}` is not a system program (use .venv/bin/{program})"
    if not (VENV_BIN / name).exists():
        return f"{name} is not installed in .venv/bin"
    if name.startswith("python") and args:
        if args[0] == "-m":
            return None if importlib.util.find_spec(args[1]) else f"python -m {args[1]}: no such module"
        return None if (REPO / args[0]).exists() else f"python {args[0]}: no such file"
    if name == "vpr":
        sub = next((a for a in args if not a.startswith("-")), None)
        return None if sub is None or sub in vpr_commands() else f"vpr {sub}: no such command"
    return None


def documented_commands() -> list[tuple[str, list[str], bool]]:
    """(where, words, activated) of every fenced shell command in README.md and docs/*.md."""
    found = []
    for path in DOCS:
        for line, block in shell_blocks(path):
            activated = False
            for words in simple_commands(block):
                found.append((f"{path.relative_to(REPO)}:{line}", words, activated))
                activated |= words[:2] in ([".", ".venv/bin/activate"], ["source", ".venv/bin/activate"])
    return found


def test_the_docs_have_shell_commands():
    commands = documented_commands()
    assert len(commands) > 20 and {"README.md", "docs/orchestration.md"} <= {w.split(":")[0] for w, _, _ in commands}


COMMANDS = documented_commands()


@pytest.mark.parametrize("where,words,activated", COMMANDS, ids=[f"{w}:{words[0]}" for w, words, _ in COMMANDS])
def test_each_documented_command_runs_where_it_is_written(where, words, activated):
    assert problem(words, activated) is None, f"{where}: `{shlex.join(words)}`: {problem(words, activated)}"


def test_the_checker_catches_what_a_fresh_shell_would_refuse():
    """The rules themselves: a bare venv program, a missing target, module, script or vpr command fail."""
    assert problem(["prefect", "deployment", "ls"], False)
    assert problem(["dvc", "repro"], False) and problem(["dvc", "repro"], True) is None
    assert problem(["python", "-m", "flows.train_all"], False)
    assert problem(["make", "no-such-target"], False)
    assert problem([".venv/bin/python", "-m", "flows.no_such_flow"], False)
    assert problem([".venv/bin/python", "bench/no_such.py"], False)
    assert problem([".venv/bin/vpr", "no-such-command"], False)
    assert problem([".venv/bin/no-such-program"], False)
    assert problem(["PREFECT_HOME=x", ".venv/bin/python", "-m", "flows.train_all"], False) is None
    assert problem(["make", "up"], False) is None and problem([".venv/bin/vpr", "api"], False) is None
    assert simple_commands("make api &  # the page\nexport A=1 && curl -s 'x#y' | head\n") == [
        ["make", "api"],
        ["export", "A=1"],
        ["curl", "-s", "x#y"],
        ["head"],
    ]
