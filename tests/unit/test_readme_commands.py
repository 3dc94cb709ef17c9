"""Every command the READMEs print names a script, a file and flags that exist, so the docs cannot drift.

Each ``bash`` block of ``README.md`` and ``cluster/README.md`` is split into commands (continuation lines joined,
comments dropped, ``&&`` / ``|`` / ``;`` separated). Then:

* ``python jobs/<job>.py args`` and ``python serve/app.py args``: the script exists and its own ``parse_args``
  accepts the arguments (unknown keys, wrong types and missing ``--config`` files fail there);
* ``python benchmarks/<name>.py --flag``: the script exists and declares every flag (``add_argument("--flag"``);
* ``ray start`` / ``ray job submit`` (and ``serve run``): every ``--flag`` is an option of Ray's click command,
  files given to them exist, and the entrypoint after ``--`` is checked as above;
* any other argument that names a file of the repository (``cluster/...``, ``serve/config.yaml``) exists.

The ``python`` blocks' import lines are imported. Running the commands is the job of the integration tests
(``tests/integration/test_user_commands.py``); this test is quick and catches a renamed key or script at once.
"""

from __future__ import annotations

import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

READMES = ("README.md", "cluster/README.md")
SEPARATORS = {"&&", "||", "|", ";", "&"}
REPO_TOP = {p.name for p in REPO_ROOT.iterdir() if not p.name.startswith(".")} - {"artifacts"}
PLACEHOLDER_DIR = "/tmp/medrag-readme-check"
"""What ``$PWD`` and other shell expansions stand for when arguments are parsed."""


@dataclass(frozen=True)
class Command:
    readme: str
    line: int
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.readme}:{self.line}: {shlex.join(self.argv)}"


def blocks(text: str, lang: str) -> list[tuple[int, str]]:
    """``(first line number, body)`` of each fenced block in language ``lang``."""
    found, body, start, inside = [], [], 0, False
    for number, line in enumerate(text.splitlines(), start=1):
        if not inside and line.strip() == f"```{lang}":
            inside, body, start = True, [], number + 1
        elif inside and line.strip() == "```":
            inside = False
            found.append((start, "\n".join(body)))
        elif inside:
            body.append(line)
    return found


def commands(readme: str) -> list[Command]:
    """The simple commands of ``readme``'s bash blocks."""
    out: list[Command] = []
    for start, body in blocks((REPO_ROOT / readme).read_text(encoding="utf-8"), "bash"):
        joined = re.sub(r"\\\n", " ", body)
        for offset, line in enumerate(joined.splitlines()):
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split, lexer.commenters = True, "#"
            current: list[str] = []
            for token in [*lexer, ";"]:
                if token in SEPARATORS:
                    if current:
                        out.append(Command(readme, start + offset, tuple(current)))
                    current = []
                else:
                    current.append(token)
    return out


ALL = [c for readme in READMES for c in commands(readme)]


def expand(arg: str) -> str:
    return re.sub(r"\$\{?(PWD|HOME)\}?", PLACEHOLDER_DIR, arg)


def program(argv: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """``(program name, arguments)`` without a leading ``VAR=value`` environment and the venv's bin path."""
    i = 0
    while i < len(argv) and re.fullmatch(r"[A-Z_]+=\S*", argv[i]):
        i += 1
    return Path(argv[i]).name if i < len(argv) else "", argv[i + 1 :]


def click_command(*cli: str) -> Any:
    """The click command behind ``ray start``, ``ray job submit`` or ``serve run``."""
    if cli == ("ray", "start"):
        from ray.scripts.scripts import start as command
    elif cli == ("ray", "job", "submit"):
        from ray.dashboard.modules.job.cli import submit as command
    elif cli == ("serve", "run"):
        from ray.serve.scripts import run as command
    else:
        raise AssertionError(f"no click command known for {' '.join(cli)}")
    return command


def check_flags(cmd: Command, args: tuple[str, ...], cli: tuple[str, ...]) -> None:
    known = {opt for param in click_command(*cli).params for opt in param.opts}
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--"):
            assert flag in known, f"{cmd}: `{' '.join(cli)}` has no flag {flag}"


def check_repo_paths(cmd: Command, args: tuple[str, ...]) -> None:
    """Arguments that name a file or folder of the repository (``cluster/...``) must exist."""
    for arg in args:
        value = arg.split("=", 1)[-1] if arg.startswith("--") else arg
        top = value.split("/", 1)[0]
        if "/" in value and top in REPO_TOP and not value.startswith(("/", "$", "<")):
            assert (REPO_ROOT / value).exists(), f"{cmd}: {value} does not exist in the repository"


def check_python(cmd: Command, args: tuple[str, ...]) -> None:
    """``python <script> args`` / ``python -m <module>``."""
    if not args or args[0] == "-m":
        return
    script, rest = args[0], tuple(expand(a) for a in args[1:])
    path = REPO_ROOT / script
    assert path.is_file(), f"{cmd}: the script {script} does not exist"
    parts = Path(script).with_suffix("").parts
    if parts[0] in ("jobs", "serve"):
        module = importlib.import_module(".".join(parts))
        assert hasattr(module, "parse_args"), f"{cmd}: {script} has no parse_args"
        module.parse_args(list(rest))  # raises naming the key / type / file that is wrong
    elif parts[0] == "benchmarks":
        declared = set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", path.read_text(encoding="utf-8")))
        for arg in rest:
            flag = arg.split("=", 1)[0]
            assert not flag.startswith("--") or flag in declared, f"{cmd}: {script} has no flag {flag}"
    else:
        check_repo_paths(cmd, rest)


def check(cmd: Command) -> None:
    name, args = program(cmd.argv)
    check_repo_paths(cmd, args)
    if name.startswith("python"):
        check_python(cmd, args)
    elif name == "ray" and args[:1] == ("start",):
        check_flags(cmd, args[1:], ("ray", "start"))
    elif name == "ray" and args[:2] == ("job", "submit"):
        head, entry = (args[2:], ()) if "--" not in args else (args[2 : args.index("--")], args[args.index("--") + 1 :])
        check_flags(cmd, head, ("ray", "job", "submit"))
        assert entry, f"{cmd}: no entrypoint after --"
        check(Command(cmd.readme, cmd.line, entry))
    elif name == "serve" and args[:1] == ("run",):
        check_flags(cmd, args[1:], ("serve", "run"))
        from serve.app import config_from_serve_file

        config_from_serve_file(REPO_ROOT / args[-1])


def test_the_readmes_have_commands() -> None:
    names = {program(c.argv)[0] for c in ALL}
    assert {"python", "ray", "serve"} <= names
    scripts = {program(c.argv)[1][0] for c in ALL if program(c.argv)[0] == "python" and program(c.argv)[1]}
    assert {"jobs/pipeline.py", "jobs/mine_prefs.py", "serve/app.py"} <= scripts


@pytest.mark.parametrize("cmd", ALL, ids=[f"{c.readme}:{c.line}:{program(c.argv)[0]}" for c in ALL])
def test_readme_command(cmd: Command) -> None:
    check(cmd)


def test_readme_python_blocks_import() -> None:
    for readme in READMES:
        for start, body in blocks((REPO_ROOT / readme).read_text(encoding="utf-8"), "python"):
            for line in body.splitlines():
                match = re.match(r"from ([\w.]+) import ([\w, ]+)", line.split("#")[0].strip())
                if match:
                    module = importlib.import_module(match.group(1))
                    for name in (n.strip() for n in match.group(2).split(",")):
                        assert hasattr(module, name), f"{readme}:{start}: {match.group(1)} has no {name}"


def test_a_drifted_command_is_caught() -> None:
    """The checker itself can fail: a misspelt key, a missing script, an unknown Ray flag."""
    for argv in (("python", "jobs/mine_prefs.py", "limt=3"), ("python", "jobs/no_such_job.py"),
                 ("ray", "start", "--head", "--no-such-flag"), ("python", "benchmarks/dpo_throughput.py", "--no-such")):
        with pytest.raises(Exception):  # noqa: B017 - ConfigError, AssertionError: whichever names the drift
            check(Command("test", 0, argv))
