"""A merge from S3 to S3 against the I/O floor, on a local S3 server.

Target: the S3 → S3 merge takes at most 1.3 × (downloading every input object with
boto3's own ``download_file`` at its default concurrency + the same merge from those
local files).

Builds (once, cached under --workdir) a Llama-shaped base and experts, starts the local
S3 server (``infra/s3_server.py``, moto, in its own process) unless --endpoint names one,
uploads the inputs (skipped when already there), then times, each as its own process:
the downloads, ``mergefleet merge`` on the downloaded files, and ``mergefleet merge`` from
``s3://`` inputs to an ``s3://`` output. It checks that both merges give the same tensors.

    python bench/bench_s3.py                       # 4 experts + base, 0.17 B params each, bf16
    python bench/bench_s3.py --method ties --layers 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import torch
import yaml
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import MERGEFLEET, build_inputs  # noqa: E402

from mergefleet.fixtures.synthetic import LlamaShape  # noqa: E402

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent


def start_server(bucket: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """``infra/s3_server.py`` on a free port; returns the process and the env that points at it."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / "infra" / "s3_server.py"), "--port", "0", "--bucket", bucket],
        stdout=subprocess.PIPE,
        text=True,
    )
    env: dict[str, str] = {}
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").strip().partition("=")
            env[name] = value
        if line.startswith("#"):
            break
    if "AWS_ENDPOINT_URL" not in env:
        process.kill()
        raise SystemExit("the S3 server did not start")
    return process, env


def upload(client, bucket: str, models: list[Path], prefix: str) -> int:
    """Upload each model directory to ``s3://bucket/prefix/<name>/`` unless it is there; returns bytes."""
    total = 0
    for model in models:
        for file in sorted(p for p in model.iterdir() if p.is_file()):
            key = f"{prefix}/{model.name}/{file.name}"
            size = file.stat().st_size
            total += size
            try:
                if client.head_object(Bucket=bucket, Key=key)["ContentLength"] == size:
                    continue
            except client.exceptions.ClientError:
                pass
            client.upload_file(str(file), bucket, key)
    return total


def download_all(client, bucket: str, prefix: str, models: list[Path], dest: Path) -> float:
    """Seconds to fetch every input object with ``download_file`` (default TransferConfig)."""
    shutil.rmtree(dest, ignore_errors=True)
    started = time.perf_counter()
    for model in models:
        (dest / model.name).mkdir(parents=True)
        for file in sorted(p for p in model.iterdir() if p.is_file()):
            client.download_file(bucket, f"{prefix}/{model.name}/{file.name}", str(dest / model.name / file.name))
    return time.perf_counter() - started


def recipe(method: str, base: str, experts: list[str], density: float, storage: dict | None = None) -> dict:
    models: list[dict] = [{"model": base}]
    for ref in experts:
        params: dict = {"weight": 1.0 / len(experts)}
        if method not in ("linear", "task_arithmetic"):
            params["density"] = density
        models.append({"model": ref, "parameters": params})
    data = {"merge_method": method, "base_model": base, "models": models, "dtype": "bfloat16"}
    if storage:
        data["fleet"] = {"storage": storage}
    return data


def run_merge(recipe_path: Path, output: str, args: argparse.Namespace, env: dict[str, str]) -> float:
    command = [
        *MERGEFLEET, "merge", str(recipe_path), output,
        "--shards", str(args.shards), "--workers", str(args.workers), "--overwrite", "--json",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"merge failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return seconds


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(directory / file, "pt") as handle:
            out |= {name: handle.get_tensor(name) for name in handle.keys()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "out")
    parser.add_argument("--endpoint", help="use this S3 server (AWS_* credentials from the environment)")
    parser.add_argument("--bucket", default="bench")
    parser.add_argument("--storage", type=json.loads, default={}, help='fleet.storage of the S3 merge, as JSON, e.g. \'{"request_bytes": 8388608}\'')
    parser.add_argument("--no-verify", action="store_true", help="skip comparing the two merges' tensors")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    shape = LlamaShape(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, vocab=args.vocab, heads=16, kv_heads=16)
    tag = f"h{shape.hidden}-l{shape.layers}-i{shape.intermediate}-v{shape.vocab}-bf16"
    base, experts = build_inputs(args.workdir, shape, args.experts)
    models = [base, *experts]

    server = None
    if args.endpoint:
        env = {"AWS_ENDPOINT_URL": args.endpoint}
    else:
        server, env = start_server(args.bucket)
    env = os.environ | env
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
                              aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"), aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"))
        with contextlib.suppress(client.exceptions.ClientError):
            client.create_bucket(Bucket=args.bucket)
        print(f"uploading {len(models)} models ({tag}) to s3://{args.bucket}/{tag} ...", flush=True)
        total = upload(client, args.bucket, models, tag)

        scratch = Path(tempfile.mkdtemp(prefix="bench-s3-", dir=args.workdir))
        try:
            download_s = download_all(client, args.bucket, tag, models, scratch / "inputs")
            local_recipe = scratch / "local.yaml"
            local_inputs = [str(scratch / "inputs" / m.name) for m in models]
            local_recipe.write_text(yaml.safe_dump(recipe(args.method, local_inputs[0], local_inputs[1:], args.density)))
            local_s = run_merge(local_recipe, str(scratch / "merged-local"), args, env)

            s3_recipe = scratch / "s3.yaml"
            s3_inputs = [f"s3://{args.bucket}/{tag}/{m.name}" for m in models]
            s3_recipe.write_text(yaml.safe_dump(recipe(args.method, s3_inputs[0], s3_inputs[1:], args.density, args.storage)))
            output = f"s3://{args.bucket}/merged-{args.method}"
            s3_s = run_merge(s3_recipe, output, args, env)

            receipts = [json.loads(client.get_object(Bucket=args.bucket, Key=f"merged-{args.method}/.mergefleet/shard-{i}.json")["Body"].read())
                        for i in range(args.shards)]
            fetched = sum(r["bytes_read"] for r in receipts)
            wanted = sum(r["tensor_bytes"] for r in receipts)
            same = None
            if not args.no_verify:
                got = scratch / "merged-s3"
                got.mkdir()
                for item in client.list_objects_v2(Bucket=args.bucket, Prefix=f"merged-{args.method}/")["Contents"]:
                    name = item["Key"].split("/", 1)[1]
                    if "/" not in name:
                        client.download_file(args.bucket, item["Key"], str(got / name))
                a, b = tensors_of(scratch / "merged-local"), tensors_of(got)
                same = a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)

    floor = download_s + local_s
    row = {
        "method": args.method, "experts": args.experts, "shape": tag, "input_bytes": total,
        "download_s": round(download_s, 2), "local_merge_s": round(local_s, 2), "s3_merge_s": round(s3_s, 2),
        "ratio": round(s3_s / floor, 3), "target": 1.3, "fetched_bytes": fetched, "tensor_bytes": wanted,
        "identical": same, "cpus": os.cpu_count(), "shards": args.shards, "workers": args.workers,
        "storage": args.storage,
    }
    print(f"\n{args.experts} experts + base, {tag}, {total / 1e9:.2f} GB of inputs, {args.method}, "
          f"{args.shards} shards on {args.workers} workers, {os.cpu_count()} CPUs"
          + (f", fleet.storage {json.dumps(args.storage)}" if args.storage else ""))
    print(f"  download_file, all inputs   {download_s:8.1f} s  ({total / download_s / 1e6:.0f} MB/s)")
    print(f"  merge from local files      {local_s:8.1f} s")
    print(f"  merge S3 -> S3              {s3_s:8.1f} s  (fetched {fetched / 1e9:.2f} GB for {wanted / 1e9:.2f} GB of tensors)")
    print(f"  ratio S3 / (download + local) = {row['ratio']:.2f}  (target <= 1.3)"
          + ("" if same is None else f"; same tensors: {same}"))
    if args.json:
        print(json.dumps(row))
    return 0 if same is not False else 1


if __name__ == "__main__":
    sys.exit(main())
