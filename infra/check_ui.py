"""Look at a tracked merge in MLflow's own UI, in a real browser: headless Chromium (Debian's
``chromium``) opens the merge's run, its logged model, the registered version and the
runs' compare view on an ``mlflow server`` on 127.0.0.1, saves a screenshot of each, and
checks what the page shows (method, scores, checkpoint location, registry version).

    python infra/check_ui.py --screenshots ui-shots

trains the tiny skill models, merges them twice (ties, task_arithmetic), evaluates and
records both merges, runs ``mergefleet compare --log``, serves the store and checks the
pages. ``tests/test_tracking.py`` runs the same page checks on its own server.
"""

from __future__ import annotations

import argparse
import html.parser
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

RENDER_BUDGET_MS = 20000
"""Virtual time Chromium gives MLflow's React app to fetch and render before the capture."""


class ChromiumMissing(RuntimeError):
    """No ``chromium`` on PATH (Debian: ``apt-get install chromium``)."""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise ChromiumMissing("no chromium on PATH; install Debian's package: apt-get install chromium")
    return found


class _Text(html.parser.HTMLParser):
    """The visible text of an HTML document (scripts and styles left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style", "noscript"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "noscript") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.parts.append(data.strip())


def page_text(dom: str) -> str:
    parser = _Text()
    parser.feed(dom)
    return "\n".join(parser.parts)


def _browse(url: str, mode: list[str], profile: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={profile}", "--window-size=1500,1100",
        f"--virtual-time-budget={RENDER_BUDGET_MS}", *mode, url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def render(url: str, screenshot: Path | None = None, *, timeout: float = 120) -> str:
    """The page's visible text after MLflow's app rendered it; with ``screenshot``, also a
    PNG of it there (a second visit: Chromium does one of the two per run)."""
    with tempfile.TemporaryDirectory(prefix="mergefleet-chromium-") as profile:
        dom = _browse(url, ["--dump-dom"], Path(profile), timeout)
        if dom.returncode != 0 or not dom.stdout:
            raise RuntimeError(f"chromium could not open {url}: {dom.stderr.strip()[-500:]}")
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            shot = _browse(url, [f"--screenshot={screenshot}"], Path(profile), timeout)
            if shot.returncode != 0 or not screenshot.is_file():
                raise RuntimeError(f"chromium took no screenshot of {url}: {shot.stderr.strip()[-500:]}")
    return page_text(dom.stdout)


@dataclass
class Page:
    """One page of the MLflow UI and what must be on it."""

    name: str
    url: str
    expected: list[str]
    text: str = ""
    missing: list[str] = field(default_factory=list)


def merge_pages(uri: str, *, experiment_id: str, run_ids: Sequence[str], model_id: str, model_name: str, method: str,
                scores: dict[str, float], checkpoint: str, registered: tuple[str, str]) -> list[Page]:
    """The pages a person opens for one merge (the first of ``run_ids``) and the compare view
    of all, in the model-training view; the experiment's page must show the registry (the
    GenAI view does not) and the comparison table that ``compare --log`` wrote."""
    from orchestrator.tracking.store import ui_page

    name, version = registered
    shown_scores = [f"{value:.3f}" for value in scores.values()]
    runs = json.dumps(list(run_ids))
    return [
        Page("experiment", ui_page(uri, f"experiments/{experiment_id}"), ["Model registry", model_name, *shown_scores]),
        Page("run", ui_page(uri, f"experiments/{experiment_id}/runs/{run_ids[0]}"), [method, *shown_scores, *scores, name, f"v{version}"]),
        Page("logged-model", ui_page(uri, f"experiments/{experiment_id}/models/{model_id}"),
             ["checkpoint", checkpoint, method, "Model versions", name, f"v{version}"]),
        Page("model-version", ui_page(uri, f"models/{name}/versions/{version}"),
             [name, f"Version {version}", "Source Model", model_name, checkpoint]),
        Page("compare", ui_page(uri, f"compare-runs?runs={runs}&experiments={json.dumps([experiment_id])}"), [method, "density.add", *scores]),
    ]


def check_pages(pages: Sequence[Page], folder: Path, *, screenshots: bool = True) -> list[Page]:
    """Render every page (its text as ``<name>.txt`` in ``folder``, with ``screenshots`` also
    ``<name>.png``); returns the pages that lack something they should show."""
    folder.mkdir(parents=True, exist_ok=True)
    for page in pages:
        page.text = render(page.url, folder / f"{page.name}.png" if screenshots else None)
        (folder / f"{page.name}.txt").write_text(page.text)
        page.missing = [text for text in page.expected if text not in page.text]
    return [page for page in pages if page.missing]


def _tracked_merges(workdir: Path, uri: str) -> dict[str, Any]:
    """Train the skill models, merge them twice, evaluate and record both merges at ``uri``."""
    from mergefleet.fixtures.skills import SkillsConfig, build_skills
    from orchestrator.evaluate.scores import evaluate_merge
    from orchestrator.pipeline import merge
    from orchestrator.plan_ref import open_plan
    from orchestrator.receipt import Receipt, ShardOutcome
    from orchestrator.recipe import parse_recipe
    from orchestrator.tracking.record import track_merge

    models = build_skills(workdir / "skills", SkillsConfig(skills=("add", "map")))
    merges = {}
    for method in ("ties", "task_arithmetic"):
        out = workdir / method
        data = models.recipe(method, output=out, shards=2, tracking_uri=uri, experiment="ui-check", register_model="ui-check-merge")
        data["fleet"]["eval"]["cache_dir"] = str(workdir / "eval-cache")
        data["name"] = f"skills-{method}"
        recipe = parse_recipe(data)
        summary = merge(recipe, str(out))
        plan = open_plan(summary.plan_ref)
        evaluation = evaluate_merge(plan, recipe.fleet.eval)
        outcomes = [
            ShardOutcome(receipt=Receipt.model_validate_json((out / f".mergefleet/shard-{i}.json").read_text()), skipped=False)
            for i in range(len(plan.shards))
        ]
        tracked = track_merge(plan, summary.manifest, outcomes, evaluation, merge_seconds=summary.seconds)
        merges[method] = {"tracked": tracked, "evaluation": evaluation, "output": plan.output}
    return merges


def main(argv: list[str] | None = None) -> int:
    """Build, serve and look; exit 1 when a page lacks what it should show."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screenshots", type=Path, default=Path("ui-screenshots"), help="folder for the PNGs and page texts")
    parser.add_argument("--workdir", type=Path, help="where models, merges and the MLflow store go (default: a temporary folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    from infra.mlflow_server import mlflow_server
    from mergefleet import cli

    with tempfile.TemporaryDirectory(prefix="mergefleet-ui-check-") as scratch:
        workdir = args.workdir or Path(scratch)
        with mlflow_server(workdir / "mlflow") as uri:
            merges = _tracked_merges(workdir, uri)
            cli.main(["compare", "ui-check", "--tracking-uri", uri, "--log", "--quiet", "--chart", str(workdir / "compare.png")])
            ties = merges["ties"]
            tracked = ties["tracked"]
            pages = merge_pages(
                uri, experiment_id=tracked.experiment_id, run_ids=[m["tracked"].run_id for m in merges.values()],
                model_id=tracked.model_id, model_name="skills-ties", method="ties", scores=ties["evaluation"].merged.scores, checkpoint=ties["output"],
                registered=("ui-check-merge", tracked.model_version),
            )
            failed = check_pages(pages, args.screenshots)
    for page in pages:
        state = "missing " + ", ".join(repr(m) for m in page.missing) if page.missing else "ok"
        print(f"{page.name}: {state}  ({args.screenshots / (page.name + '.png')})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
