"""The terminal as a person meets it: help for every argument, ``--json`` that prints only
JSON and writes no file it was not asked for, tables that stay readable in a narrow or
piped output, a re-run that says it merged nothing, and ``mergefleet run`` with other
libraries' output kept out of the way (in a log file named at the end)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

from mergefleet import cli
from tests.helpers import MERGEFLEET


def _parsers(parser: argparse.ArgumentParser, path: str = "mergefleet") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_argument_of_every_command_has_help() -> None:
    missing = []
    seen = 0
    for path, parser in _parsers(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            seen += 1
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{path} {choice.dest}" for choice in action._choices_actions if not (choice.help or "").strip()]
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert seen > 80  # every command's arguments were walked
    assert missing == []


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MERGEFLEET, *args], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_command_on_one_line() -> None:
    done = run_cli("--help", env={"COLUMNS": "80"})
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    listed = lines[lines.index("  COMMAND") + 1 : lines.index("options:") - 1]
    assert sorted(line.split()[0] for line in listed) == list(cli.COMMANDS)
    assert all(len(line.split(maxsplit=1)) == 2 and len(line) <= 80 for line in listed), listed
