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
from tests.helpers import MERGEFLEET, gta_recipe, write_recipe


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


NOISE = ("Running loglikelihood requests", "Overwriting default num_fewshot", "not a git repository", "Finished in state Completed")
"""What other code prints during a run: lm-eval's tqdm bar and its warning, git's complaint
(a subprocess lm-eval starts in a directory that is no repository), Prefect's run logs."""


def _isolated_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No Prefect server (the run starts its own embedded API) and a cache of its own."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_") and key != "COLUMNS"}
    return env | {"PREFECT_HOME": str(tmp_path / "prefect-home"), "XDG_CACHE_HOME": str(tmp_path / "cache")} | extra


def _named_log(stderr: str) -> Path:
    line = next(line for line in stderr.splitlines() if line.startswith("other libraries' output"))
    return Path(line.rsplit(": ", 1)[1])


def test_run_shows_the_flow_and_keeps_other_libraries_output_in_a_log(skill_models, eval_cache: Path, tmp_path: Path) -> None:
    data = skill_models.recipe("ties", output=tmp_path / "merged", shards=3, workers=2, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                               experiment="terminal")
    data["fleet"]["eval"] |= {"cache_dir": str(eval_cache), "limit": 4, "num_fewshot": 0}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(data))
    env = _isolated_env(tmp_path, COLUMNS="40")  # piped, and narrow
    done = subprocess.run([*MERGEFLEET, "run", str(recipe)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = done.stdout + done.stderr
    assert [noise for noise in NOISE if noise in shown] == []
    log = _named_log(done.stderr)
    assert log.parent == tmp_path / "cache" / "mergefleet" / "logs" and log.name.startswith("run-")
    assert [noise for noise in NOISE if noise not in log.read_text()] == []

    lines = done.stderr.splitlines()  # piped: one line per finished step
    assert any(line.startswith("plan: ") and "ties, 3 inputs, 3 shards" in line for line in lines)
    for index in range(3):  # each shard with its bytes and rate
        assert any(line.startswith(f"shard {index}: ") and " s, " in line and line.endswith("/s") for line in lines), index
    assert any(line.startswith("assemble: 3 files") for line in lines)
    for label in ("merged", "base", "add", "map"):
        assert any(line.startswith(f"eval {label}: skill_add ") for line in lines), label
    table = lines[lines.index(next(l for l in lines if l.startswith("scores ("))) + 1 : lines.index(next(l for l in lines if l.startswith("recorded as")))]
    assert all(len(line) <= 40 for line in table), table  # too narrow for columns: one block per task
    assert [line for line in table if line.startswith("task ")] == ["task skill_add", "task skill_map"]
    for column in ("base", "add", "map", "merged", "normalised"):
        assert sum(line.split()[0] == column for line in table) == 2, column
    ui = next(line for line in lines if line.startswith("open it: "))
    assert ui.split("open it: ")[1].split()[0].endswith("mlflow") and f"sqlite:///{tmp_path / 'mlflow.db'}" in ui

    # compare: a narrow table, and --json writes no chart into the current directory
    compare = [*MERGEFLEET, "compare", "terminal", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    listing = subprocess.run(compare, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0, listing.stderr[-3000:]
    lines = listing.stderr.splitlines()
    table = lines[: lines.index(next(l for l in lines if l.startswith("scores:")))]
    assert all(len(line) <= 40 for line in table) and table[0].startswith("run ties-"), listing.stderr
    assert {"method", "skill_add", "skill_map", "normalised", "seconds"} <= {line.split()[0] for line in table[1:]}
    assert all(line.startswith("  ") for line in table[1:])
    (tmp_path / "mergefleet-compare.png").unlink()  # without --json the chart is written here, as documented
    quiet_cwd = tmp_path / "json-cwd"
    quiet_cwd.mkdir()
    compared = subprocess.run([*compare, "--json"], cwd=quiet_cwd, env=env, capture_output=True, text=True, timeout=300)
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert json.loads(compared.stdout)["chart"] is None and len(compared.stdout.strip().splitlines()) == 1
    assert list(quiet_cwd.iterdir()) == []


def test_an_error_inside_the_flow_still_reaches_the_terminal_in_one_line(family, tmp_path: Path) -> None:
    base, experts = family
    data = gta_recipe("ties", base, experts[:1])
    data["fleet"] = {"output": str(tmp_path / "merged"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                     "eval": {"tasks": [str(tmp_path / "no-such-tasks.yaml")], "cache_dir": str(tmp_path / "eval")}}
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    done = subprocess.run([*MERGEFLEET, "run", str(recipe)], cwd=tmp_path, env=_isolated_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no-such-tasks.yaml" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert "Traceback" in _named_log(done.stderr).read_text()  # Prefect's account of the failed task run


def test_json_prints_only_json_and_writes_no_file_it_was_not_asked_for(family, tmp_path: Path) -> None:
    base, experts = family
    recipe = write_recipe(tmp_path / "recipe.yaml", gta_recipe("ties", base, experts[:2]))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "merged"
    env = _isolated_env(tmp_path)
    for command in (["plan", str(recipe), str(out), "--shards", "2"], ["shard", str(out), "--index", "0"],
                    ["merge", str(recipe), str(out), "--shards", "2"], ["assemble", str(out)]):
        done = subprocess.run([*MERGEFLEET, *command, "--json"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        assert isinstance(json.loads(done.stdout), dict) and len(done.stdout.strip().splitlines()) == 1, command
    assert list(cwd.iterdir()) == []
    logs = tmp_path / "cache" / "mergefleet" / "logs"
    assert logs.is_dir() and [log for log in logs.iterdir() if log.stat().st_size == 0] == []  # no empty log left behind

    again = subprocess.run([*MERGEFLEET, "merge", str(recipe), str(out), "--shards", "2"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = next(line for line in again.stderr.splitlines() if "already done" in line)
    assert summary.startswith(f"all 2 shards already done; nothing merged into {out} (") and "/s" not in summary


def test_narrow_plan_explain_keeps_column_names_whole(family, tmp_path: Path) -> None:
    base, experts = family
    recipe = write_recipe(tmp_path / "recipe.yaml", gta_recipe("ties", base, experts[:2]))
    done = subprocess.run([*MERGEFLEET, "plan", str(recipe), str(tmp_path / "out"), "--explain"], env=_isolated_env(tmp_path, COLUMNS="40"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("group ")) : lines.index(next(l for l in lines if "expected peak" in l))]
    assert all(len(line) <= 40 for line in table), table
    blocks = [line for line in table if line.startswith("group ")]
    assert blocks[0] == "group pre" and blocks[-1] == "group post"
    for name in ("shard", "tensors", "reads", "writes", "peak memory"):  # every column, whole, in every block
        assert sum(line.strip().startswith(name + " ") for line in table) == len(blocks), name


def test_old_logs_are_pruned_even_when_another_command_removes_one_first(family, tmp_path: Path) -> None:
    """Two commands starting together both prune the log directory; a log the other one
    removed between listing and ``stat`` (here: a dangling link) must not stop this one."""
    base, experts = family
    recipe = write_recipe(tmp_path / "recipe.yaml", gta_recipe("ties", base, experts[:2]))
    logs = tmp_path / "cache" / "mergefleet" / "logs"
    logs.mkdir(parents=True)
    older = []
    for age in range(25):
        log = logs / f"merge-20260101-0000{age:02d}-{age}.log"
        log.write_text("old\n")
        os.utime(log, (1_700_000_000 + age, 1_700_000_000 + age))
        older.append(log)
    (logs / "merge-20260101-000099-99.log").symlink_to(logs / "removed-by-the-other-command")
    done = subprocess.run([*MERGEFLEET, "plan", str(recipe), str(tmp_path / "out"), "--json"], env=_isolated_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [log.exists() for log in older] == [False] * 6 + [True] * 19
