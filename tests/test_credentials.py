"""Credentials never stored: a URL with user information is refused, and distinctive fake
secrets planted wherever a user might put one (the recipe's free text, the AWS environment
of the S3 endpoint) appear in no file a real merge, flow run and MLflow record produce."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from orchestrator.redact import redact, redact_data
from tests.helpers import MERGEFLEET, gta_recipe, write_recipe
from tests.s3_server import s3_credentials, s3_server  # noqa: F401 -- fixture

ROOT = Path(__file__).resolve().parent.parent
ENV = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

KEY_ID = "AKIAPLANTEDKEYID0001"
SECRET_KEY = "plantedEnvSecret/Key+0123456789abcdefXYZ"
SESSION_TOKEN = "FwoGZXIvYXdzEPLANTEDsessionTOKEN0123456789"
NAME_TOKEN = "plantedNameToken4242"
RECIPE_KEY_ID = "ASIAPLANTEDRECIPE001"
EXPERIMENT_PASSWORD = "plantedExpPassword77"
PLANTED = [KEY_ID, SECRET_KEY, SESSION_TOKEN, NAME_TOKEN, RECIPE_KEY_ID, EXPERIMENT_PASSWORD]


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("s3://AKIAIOSFODNN7EXAMPLE:wJal/rX%2FUt@n:FE@host:9000/bucket", "wJal/rX%2FUt@n:FE"),
        ("see http://someone@host/x", "someone"),
        ("aws_secret_access_key = 'abc/def+ghi'", "abc/def+ghi"),
        ('{"Authorization": "AWS4-HMAC-SHA256 Credential=AKIA/2026, Signature=abcdef"}', "Signature=abcdef"),
        ("X-Amz-Security-Token=IQoJb3JpZ2luX2VjEXAMPLE%2Ftoken&X-Amz-Date=1", "IQoJb3JpZ2luX2VjEXAMPLE"),
        ("key ASIAABCDEFGHIJKLMNOP in a log", "ASIAABCDEFGHIJKLMNOP"),
        ("password: hunter2hunter2", "hunter2hunter2"),
    ],
)
def test_redact_removes_each_credential_shape(text: str, secret: str) -> None:
    assert secret in text and secret not in redact(text)


def test_redact_keeps_what_is_not_a_credential() -> None:
    plain = "tokenizer_source: base, pad_token: <pad>, max_tokens=5, s3://bucket/key@v2, http://127.0.0.1:9000/x"
    assert redact(plain) == plain
    assert redact_data({"password": "x", "tokenizer": {"pad_token": "<pad>"}}) == {"password": "***", "tokenizer": {"pad_token": "<pad>"}}


@pytest.mark.parametrize(
    ("where", "key"),
    [("base_model", "base_model"), ("endpoint", "fleet.storage.endpoint_url"), ("output", "output")],
)
def test_a_url_with_user_information_is_refused_naming_the_key(family, tmp_path: Path, where: str, key: str) -> None:
    base, experts = family
    secret = "pl%2Fanted:se/cr@et"
    url = f"s3://someone:{secret}@bucket/models/base"
    data = gta_recipe("task_arithmetic", base, experts[:1])
    output = str(tmp_path / "out")
    if where == "base_model":
        data["base_model"] = data["models"][0]["model"] = url
    elif where == "endpoint":
        data["fleet"] = {"storage": {"endpoint_url": f"http://someone:{secret}@127.0.0.1:9000"}}
    else:
        output = f"s3://someone:{secret}@bucket/out"
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    result = subprocess.run([*MERGEFLEET, "plan", str(recipe), output, "--json"], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 2, result.stderr
    error = json.loads(result.stdout)
    assert error["kind"] == "recipe" and error["key"] == key, error
    assert "user name or password" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    for part in ("se/cr@et", "pl%2Fanted"):
        assert part not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["plan", "merge"])
def test_a_recipe_given_as_a_url_is_refused_without_its_secret(tmp_path: Path, command: str) -> None:
    secret = "pl%2Fanted:se/cr@et"
    url = f"s3://someone:{secret}@bucket/recipes/ties.yaml"
    result = subprocess.run([*MERGEFLEET, command, url, str(tmp_path / "out")], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "is a URL" in last and "local file" in last, result.stderr
    for part in ("se/cr@et", "pl%2Fanted"):
        assert part not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # an MLflow server and an ephemeral Prefect server
def test_planted_secrets_reach_no_file_of_a_merge_its_flow_and_its_mlflow_run(
    family, s3_server, mlflow_server, tmp_path: Path  # noqa: F811 -- fixtures
) -> None:
    base, experts = family
    s3_server.bucket("planted")
    refs = [s3_server.upload_dir(path, "planted", f"in/{path.name}") for path in (base, experts[0])]
    data = gta_recipe("task_arithmetic", Path(refs[0]), [Path(refs[1])])
    data["base_model"] = data["models"][0]["model"] = refs[0]
    data["models"][1]["model"] = refs[1]
    data["name"] = f"nightly token={NAME_TOKEN} {RECIPE_KEY_ID}"
    data["fleet"] = {
        "shards": 2,
        "experiment": f"planted password={EXPERIMENT_PASSWORD}",
        "tracking_uri": mlflow_server["uri"],
        "storage": {"endpoint_url": s3_server.endpoint},
    }
    (tmp_path / "input").mkdir()
    recipe = write_recipe(tmp_path / "input" / "recipe.yaml", data)  # the user's own file: not searched
    produced = tmp_path / "produced"
    produced.mkdir()
    env = ENV | {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_SESSION_TOKEN": SESSION_TOKEN,
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "PREFECT_HOME": str(produced / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "XDG_CACHE_HOME": str(produced / "cache"),
    }
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    run = subprocess.run(
        [*MERGEFLEET, "run", str(recipe), str(produced / "out"), "--json", "--debug"],
        capture_output=True, text=True, env=env, timeout=600, cwd=produced,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout)
    assert result["tracking"]["run_id"] and (produced / "out" / "mergefleet.json").exists()

    written = [p for root in (produced, mlflow_server["root"]) for p in root.rglob("*") if p.is_file()]
    assert any(p.name.startswith("prefect") and p.suffix == ".db" for p in written)  # Prefect's database is searched
    assert any("artifacts" in p.parts for p in written)  # and the MLflow run's artifacts
    found = {
        (secret, str(path)) for path in written for secret in PLANTED if secret.encode() in path.read_bytes()
    } | {(secret, "the command's output") for secret in PLANTED if secret in run.stdout + run.stderr}
    assert not found, sorted(found)
    # the run happened with the planted names, redacted: the record is there, its secrets are not
    assert "nightly token=***" in (produced / "out" / ".mergefleet" / "plan.json").read_text()
