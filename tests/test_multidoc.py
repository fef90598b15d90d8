"""Multi-document recipes (orchestrator/multidoc.py) as mergekit-multi runs them.

The same YAML file goes to mergekit 0.1.5's ``mergekit-multi`` and to mergefleet: two
named intermediates (a slerp and a ties) and an unnamed linear merge of them. Then the
cache: a re-run merges nothing again, and a changed input redoes only the intermediate
that reads it and the final merge. Then bad files, and the Prefect flow with its MLflow runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from mergefleet import cli
from mergefleet.fixtures.synthetic import fine_tuned, random_weights, save_checkpoint
from orchestrator.errors import RecipeError
from orchestrator.multidoc import load_graph, merge_graph, plan_graph
from orchestrator.recipe import load_recipe
from tests.helpers import MERGEFLEET, TINY, hold_lock_elsewhere, read_tensors, write_recipe
from tests.mergekit_runner import load_tensors


def documents(base: Path, experts: list[Path]) -> list[dict[str, Any]]:
    """smooth (slerp of the base and expert 1), sparse (ties of experts 2 and 3), and the final linear of both."""
    return [
        {
            "name": "smooth",
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(experts[0])}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.8]}, {"value": 0.35}]},
            "dtype": "float32",
        },
        {
            "name": "sparse",
            "merge_method": "ties",
            "base_model": str(base),
            "models": [
                {"model": str(base)},
                {"model": str(experts[1]), "parameters": {"weight": [0.4, 0.9], "density": 0.5}},
                {"model": str(experts[2]), "parameters": {"weight": 0.6, "density": 0.7}},
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
        {
            "merge_method": "linear",
            "models": [{"model": "smooth", "parameters": {"weight": 0.7}}, {"model": "sparse", "parameters": {"weight": 0.3}}],
            "dtype": "float32",
        },
    ]


def write_documents(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], label: str) -> None:
    assert got.keys() == expected.keys(), label
    for name, want in expected.items():
        assert got[name].dtype == want.dtype == torch.float32, f"{label}: {name}"
        difference = (got[name] - want).abs().max().item()
        assert difference <= 1e-6, f"{label}: {name} differs from mergekit-multi's by {difference}"


@pytest.mark.slow
def test_same_tensors_as_mergekit_multi(family, tmp_path: Path) -> None:
    base, experts = family
    recipe = write_documents(tmp_path / "multi.yaml", documents(base, experts))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run(
        [sys.executable, "-m", "mergekit.scripts.multimerge", str(recipe), "--intermediate-dir", str(tmp_path / "mk-parts"),
         "--out-path", str(tmp_path / "mk-out"), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
        env=env, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip

    intermediates, summary = merge_graph(load_graph(recipe), str(tmp_path / "out"), shards=2)

    assert [(r.name, r.cached) for r in intermediates] == [("smooth", False), ("sparse", False)]
    for result in intermediates:
        assert Path(result.output) == tmp_path / "out.intermediates" / result.name
        assert_close(read_tensors(Path(result.output)), load_tensors(tmp_path / "mk-parts" / result.name), result.name)
    assert_close(read_tensors(tmp_path / "out"), load_tensors(tmp_path / "mk-out"), "final")
    assert summary.method == "linear"


def _copy_family(family: tuple[Path, list[Path]], root: Path) -> tuple[Path, list[Path]]:
    base, experts = family
    copies = [Path(shutil.copytree(path, root / path.name)) for path in (base, *experts)]
    return copies[0], copies[1:]


def _file_times(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir() if p.is_file()}


def test_rerun_merges_only_what_changed(family, tmp_path: Path) -> None:
    base, experts = _copy_family(family, tmp_path / "inputs")
    recipe = write_documents(tmp_path / "multi.yaml", documents(base, experts))
    out = tmp_path / "out"
    before = plan_graph(load_graph(recipe), str(out))
    assert [(node.name, node.state) for node in before] == [("smooth", "to merge"), ("sparse", "to merge"), (None, "waits for smooth, sparse")]
    first, final = merge_graph(load_graph(recipe), str(out))
    assert [r.cached for r in first] == [False, False] and final.shards_skipped == 0
    after = plan_graph(load_graph(recipe), str(out))
    assert [(node.state, node.plan and node.plan.plan_id) for node in after] == [
        ("merged", first[0].plan_id),
        ("merged", first[1].plan_id),
        ("merged", final.plan_id),
    ]
    parts = {r.name: Path(r.output) for r in first}
    times = {name: _file_times(path) for name, path in parts.items()}

    again, final_again = merge_graph(load_graph(recipe), str(out))
    assert [(r.name, r.cached, r.plan_id) for r in again] == [(r.name, True, r.plan_id) for r in first]
    assert final_again.plan_id == final.plan_id and final_again.shards_skipped == final_again.shards
    assert {name: _file_times(path) for name, path in parts.items()} == times  # nothing rewritten

    changed = fine_tuned(random_weights(TINY, seed=7, dtype=torch.float32), seed=999)
    shutil.rmtree(experts[0])
    save_checkpoint(experts[0], changed, TINY)  # smooth reads it; sparse does not
    redone, final_redone = merge_graph(load_graph(recipe), str(out), overwrite=True)
    assert [(r.name, r.cached) for r in redone] == [("smooth", False), ("sparse", True)]
    assert redone[0].plan_id != first[0].plan_id and redone[1].plan_id == first[1].plan_id
    assert _file_times(parts["sparse"]) == times["sparse"]
    assert final_redone.plan_id != final.plan_id and final_redone.shards_skipped == 0
    smooth = read_tensors(parts["smooth"])
    sparse = read_tensors(parts["sparse"])
    merged = read_tensors(out)
    for name in ("model.norm.weight", "model.layers.3.mlp.down_proj.weight"):
        assert torch.allclose(merged[name], 0.7 * smooth[name] + 0.3 * sparse[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda docs: docs[2]["models"][1].update(model="sprase"), ["document 3", "models.1.model 'sprase'", "did you mean 'sparse'"]),
        (lambda docs: docs[1].update(name="smooth"), ["document 2", "name 'smooth' is already the name of document 1"]),
        (lambda docs: docs[0]["models"][1].update(model="sparse") or docs[1]["models"][1].update(model="smooth"), ["cycle", "smooth -> sparse -> smooth"]),
        (lambda docs: docs[0].pop("name"), ["document 3", "a second document without 'name:'"]),
        (lambda docs: docs[0].update(fleet={"shards": 2}), ["document 1 ('smooth')", "'fleet:' belongs in the final merge's document (document 3)"]),
        (lambda docs: docs[2].update(name="last") or docs[0].update(base_model="last"), ["document 1 ('smooth')", "uses 'last', the final merge"]),
        (lambda docs: docs[1].update(merge_method="tiess"), ["tiess"]),
    ],
    ids=["unknown-reference", "duplicate-name", "cycle", "two-unnamed", "fleet-in-intermediate", "final-is-used", "unknown-method"],
)
def test_bad_multi_document_recipes_are_one_line_errors(family, tmp_path: Path, change: Any, expected: list[str]) -> None:
    docs = documents(*family)
    change(docs)
    recipe = write_documents(tmp_path / "bad.yaml", docs)
    with pytest.raises(RecipeError) as caught:
        load_graph(recipe)
    message = str(caught.value)
    assert "\n" not in message and str(recipe) in message
    for part in expected:
        assert part in message


def test_documents_run_after_the_documents_they_read(family, tmp_path: Path) -> None:
    smooth, sparse, final = documents(*family)
    sparse["models"][1]["model"] = "smooth"  # sparse reads smooth, which the file defines after it
    graph = load_graph(write_documents(tmp_path / "order.yaml", [final, sparse, smooth]))
    assert [(node.name, node.position, node.needs) for node in graph.nodes] == [
        ("smooth", 3, ()),
        ("sparse", 2, ("smooth",)),
        (None, 1, ("smooth", "sparse")),
    ]


def test_cli_refuses_a_bad_multi_document_recipe_before_merging(family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = documents(*family)
    docs[2]["models"][0]["model"] = "smoth"
    recipe = write_documents(tmp_path / "bad.yaml", docs)
    assert cli.main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.strip().count("\n") == 0 and "did you mean 'smooth'" in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.intermediates").exists()


def test_deploy_refuses_a_multi_document_recipe(family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_documents(tmp_path / "multi.yaml", documents(*family))
    assert cli.main(["deploy", str(recipe), str(tmp_path / "out"), "--pool", "p"]) == 2
    assert "holds 3 documents; deploy takes a single-document recipe" in capsys.readouterr().err


def test_a_single_document_recipe_reads_as_before(family, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "one.yaml", documents(*family)[1])
    graph = load_graph(recipe)
    assert graph.is_single and graph.final.recipe == load_recipe(recipe)


@pytest.fixture
def tracking_env(real_prefect_server: tuple[dict[str, str], Path], tmp_path: Path) -> dict[str, str]:
    """The session's Prefect server, and an MLflow store of this test's own."""
    env = dict(real_prefect_server[0])
    return env | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def test_run_is_one_flow_with_an_mlflow_run_per_merge(family, tracking_env: dict[str, str], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    recipe = write_documents(tmp_path / "multi.yaml", documents(*family))
    done = subprocess.run(
        [*MERGEFLEET, "run", str(recipe), str(tmp_path / "out"), "--json"], env=tracking_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert [(item["name"], item["cached"]) for item in result["intermediates"]] == [("smooth", False), ("sparse", False)]

    api = tracking_env["PREFECT_API_URL"]
    task_runs = httpx.post(
        f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [result["flow_run_id"]]}}, "sort": "EXPECTED_START_TIME_ASC"}, timeout=10
    ).json()
    names = [run["name"] for run in task_runs]
    assert names.index("plan-smooth") < names.index("plan-sparse") < names.index("plan") < names.index("link-runs")
    assert {run["state_type"] for run in task_runs} == {"COMPLETED"}

    client = MlflowClient(tracking_env["MLFLOW_TRACKING_URI"])
    final = client.get_run(result["tracking"]["run_id"])
    listed = json.loads(final.data.tags["mergefleet.intermediate_runs"])
    assert listed == {item["name"]: item["run_id"] for item in result["intermediates"]}
    for name, run_id in listed.items():
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == final.info.run_id == run.data.tags["mergefleet.final_run_id"]
        assert run.data.tags["mergefleet.intermediate"] == name and run.data.tags["mergefleet.cached"] == "false"
        assert run.data.tags["mergefleet.output"] == str(tmp_path / "out.intermediates" / name)
        # the final run was opened when the flow began: it spans every merge of the recipe
        assert final.info.start_time <= run.info.start_time <= run.info.end_time <= final.info.end_time
    assert final.info.status == "FINISHED"

    parts = {name: read_tensors(tmp_path / "out.intermediates" / name) for name in listed}
    merged = read_tensors(tmp_path / "out")
    for name, tensor in merged.items():  # the final merge read the intermediates this flow run wrote
        assert torch.allclose(tensor, 0.7 * parts["smooth"][name] + 0.3 * parts["sparse"][name], atol=1e-6, rtol=0), name


def test_a_run_is_refused_at_an_intermediate_another_run_holds(family, tracking_env: dict[str, str], tmp_path: Path) -> None:
    """The flow holds each intermediate's lock from its claim to its last file, as the final output's."""
    recipe = write_documents(tmp_path / "multi.yaml", documents(*family))
    smooth = tmp_path / "out.intermediates" / "smooth"
    with hold_lock_elsewhere(smooth) as holder:
        done = subprocess.run([*MERGEFLEET, "run", str(recipe), str(tmp_path / "out")], env=tracking_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 6, done.stderr[-3000:]
    assert f"pid {holder.pid}" in done.stderr.strip().splitlines()[-1], done.stderr[-3000:]
    assert not list(smooth.glob("*.safetensors")) and not (smooth / "mergefleet.json").exists()
    assert not (tmp_path / "out" / "mergefleet.json").exists()


def test_a_second_run_is_refused_while_the_first_is_between_an_intermediates_plan_and_its_last_file(
    family, tracking_env: dict[str, str], tmp_path: Path
) -> None:
    """The first run is frozen (SIGSTOP) once a shard of an intermediate is written, before
    that intermediate's last file: the same recipe run again must stop at that intermediate,
    not write into it. A lock held only for the plan step would let the second run in here."""
    recipe = write_documents(tmp_path / "multi.yaml", documents(*family))
    smooth = tmp_path / "out.intermediates" / "smooth"
    command = [*MERGEFLEET, "run", str(recipe), str(tmp_path / "out")]
    first = subprocess.Popen(command, env=tracking_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (smooth / ".mergefleet" / "shard-0.json").exists():  # the plan step is over
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended before a shard of 'smooth'"
            time.sleep(0.002)
        os.kill(first.pid, signal.SIGSTOP)
        assert not (smooth / "mergefleet.json").exists(), "the first run finished 'smooth' before it could be frozen"
        second = subprocess.run(command, env=tracking_env, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.kill()
        first.wait()
    last_line = second.stderr.strip().splitlines()[-1]
    assert second.returncode == 6 and str(smooth) in last_line and f"pid {first.pid}" in last_line, second.stderr[-3000:]
    assert not (smooth / "mergefleet.json").exists() and not (tmp_path / "out" / "mergefleet.json").exists()
