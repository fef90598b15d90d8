"""Read a Dockerfile's instructions the way the builder does (continuations, JSON or shell form)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        """ENTRYPOINT/CMD/RUN arguments as a list (JSON form), or the shell form wrapped in sh -c."""
        text = self.arguments.strip()
        if text.startswith("["):
            return json.loads(text)
        return ["/bin/sh", "-c", text]


def instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    result = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        result.append(Instruction(keyword.upper(), arguments.strip()))
    return result


def env(items: list[Instruction]) -> dict[str, str]:
    """The image's ENV (KEY=VALUE pairs; $PATH-style references left as written)."""
    values: dict[str, str] = {}
    for item in items:
        if item.keyword == "ENV":
            for pair in shlex.split(item.arguments):
                key, _, value = pair.partition("=")
                values[key] = value
    return values


def last(items: list[Instruction], keyword: str) -> Instruction:
    return [item for item in items if item.keyword == keyword][-1]
