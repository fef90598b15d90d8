"""Checkpoints on S3, against a real S3 server (moto in server mode on 127.0.0.1).

Merges from S3 to S3 and mixed, the bytes each shard fetches, inputs that change,
access denied, a killed shard's upload, lying headers, retries, the ETag cache, and
credentials kept out of every written file.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergefleet.fixtures.synthetic import LlamaShape, fine_tuned, random_weights, save_checkpoint
from orchestrator.errors import CheckpointError, OutputError, PlanError, RecipeError
from orchestrator.pipeline import merge, prepare_output
from orchestrator.plan import build_plan
from orchestrator.plan_ref import PlanRef, open_plan
from orchestrator.receipt import Receipt
from orchestrator.recipe import parse_recipe
from orchestrator.shard import run_shard
from orchestrator.storage import checkpoint as ckpt
from orchestrator.storage.base import MiB, StorageOptions
from orchestrator.storage.s3.readahead import ReadAhead, plan_requests
from orchestrator.storage.s3.sink import S3Output
from orchestrator.storage.s3.source import S3Checkpoint
from orchestrator.storage.tensors import read_rows, read_tensor
from tests.helpers import assert_same_tensors, gta_recipe, read_tensors
from tests.s3_server import ACCESS_KEY, SECRET_KEY, FlakyProxy, deny_policy, s3_server  # noqa: F401 -- fixture

ROOT = Path(__file__).resolve().parent.parent
METHOD = "task_arithmetic"  # storage is under test here, not the method: the cheapest one with a base


@pytest.fixture(scope="module")
def s3_family(s3_server, family):
    """The tiny family on S3: (local base, local experts, s3 base, s3 experts)."""
    base, experts = family
    s3_base = s3_server.upload_dir(base, "models", "tiny/base")
    s3_experts = [s3_server.upload_dir(path, "models", f"tiny/{path.name}") for path in experts]
    s3_server.bucket("merges")
    return base, experts, s3_base, s3_experts


@pytest.fixture(scope="module")
def s3_merge(s3_server, s3_family, tmp_path_factory):
    """A merge S3 → S3 in 3 shards on 2 worker processes, and the same merge on local disk.

    The endpoint is taken out of the environment for the S3 merge: only the recipe's
    fleet.storage (carried in the plan) tells the worker processes where S3 is.
    """
    base, experts, s3_base, s3_experts = s3_family
    root = tmp_path_factory.mktemp("s3-merge")
    merge(parse_recipe(gta_recipe(METHOD, base, experts)), str(root / "local"), shards=3)
    storage = {"endpoint_url": s3_server.endpoint, "request_bytes": MiB, "max_concurrency": 3}
    recipe = parse_recipe(gta_recipe(METHOD, s3_base, s3_experts, fleet={"storage": storage}))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("AWS_ENDPOINT_URL")
        summary = merge(recipe, "s3://merges/ties", shards=3, workers=2)
    return {
        "summary": summary,
        "local": root / "local",
        "downloaded": s3_server.download("s3://merges/ties", root / "downloaded"),
        "storage": storage,
    }


# ---------------------------------------------------------------- merges


def test_s3_to_s3_sharded_merge_is_byte_identical_to_local(s3_server, s3_merge) -> None:
    out = s3_merge["downloaded"]
    assert_same_tensors(read_tensors(out), read_tensors(s3_merge["local"]))
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == [
        ".mergefleet/plan.json",
        ".mergefleet/shard-0.json",
        ".mergefleet/shard-1.json",
        ".mergefleet/shard-2.json",
        "README.md",
        "config.json",
        "mergefleet.json",
        "mergekit_config.yml",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    plan = json.loads((out / ".mergefleet/plan.json").read_text())
    assert plan["storage"]["endpoint_url"] == s3_server.endpoint
    assert plan["storage"]["request_bytes"] == MiB
    assert plan["inputs"][0]["ref"] == "s3://models/tiny/base"
    assert all(fp["version"].startswith("etag:") for inp in plan["inputs"] for fp in inp["fingerprints"])
    assert S3Output("s3://merges/ties").unfinished_uploads() == []
    assert json.loads((out / "mergefleet.json").read_text())["plan_id"] == s3_merge["summary"].plan_id


def test_each_shard_fetches_only_its_own_bytes(s3_merge) -> None:
    out = s3_merge["downloaded"]
    receipts = [Receipt.model_validate_json((out / f".mergefleet/shard-{i}.json").read_text()) for i in range(3)]
    total = sum(r.tensor_bytes for r in receipts)
    for receipt in receipts:
        assert receipt.tensor_bytes <= receipt.bytes_read <= 1.05 * receipt.tensor_bytes, receipt
        assert receipt.bytes_read < 0.6 * total
    manifest = json.loads((out / "mergefleet.json").read_text())
    assert [s["bytes_read"] for s in manifest["shards"]] == [r.bytes_read for r in receipts]


def test_cli_merge_with_mixed_local_and_s3_inputs_and_outputs(s3_server, s3_family, s3_merge, tmp_path) -> None:
    from mergefleet import cli
    from tests.helpers import write_recipe

    base, experts, s3_base, s3_experts = s3_family
    expected = read_tensors(s3_merge["local"])
    mixed = write_recipe(tmp_path / "mixed.yaml", gta_recipe(METHOD, base, [s3_experts[0], experts[1], s3_experts[2]]))
    assert cli.main(["merge", str(mixed), "s3://merges/mixed", "--shards", "2", "--quiet"]) == 0
    assert_same_tensors(read_tensors(s3_server.download("s3://merges/mixed", tmp_path / "mixed")), expected)
    from_s3 = write_recipe(tmp_path / "from-s3.yaml", gta_recipe(METHOD, s3_base, s3_experts))
    assert cli.main(["merge", str(from_s3), str(tmp_path / "local-out"), "--quiet"]) == 0
    assert_same_tensors(read_tensors(tmp_path / "local-out"), expected)


# ---------------------------------------------------------------- credentials


def test_credentials_never_reach_written_files_or_messages(s3_server, s3_merge, caplog) -> None:
    for path in s3_merge["downloaded"].rglob("*"):
        if path.is_file():
            assert SECRET_KEY.encode() not in path.read_bytes(), path
            assert ACCESS_KEY.encode() not in path.read_bytes(), path
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"merge_method": "linear", "models": ["a", "b"], "fleet": {"storage": {"aws_secret_access_key": SECRET_KEY}}})
    message = str(caught.value)
    assert "credentials never go in a recipe" in message and "AWS_ACCESS_KEY_ID" in message
    assert SECRET_KEY not in message and SECRET_KEY not in repr(caught.value.__cause__)
    with pytest.raises(RecipeError, match="unknown key 'fleet.storage.bucket'; allowed here: .*endpoint_url"):
        parse_recipe({"merge_method": "linear", "models": ["a", "b"], "fleet": {"storage": {"bucket": "x"}}}, strict=True)
    with pytest.raises(ValueError, match="must not carry a user name or password"):
        StorageOptions(endpoint_url="http://user:pw@127.0.0.1:9000")
    caplog.set_level("DEBUG")
    with pytest.MonkeyPatch.context() as patch, pytest.raises(CheckpointError) as denied:
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY + "-wrong")
        with s3_server.enforce_auth():
            S3Checkpoint("s3://models/tiny/base")
    assert SECRET_KEY not in str(denied.value)
    assert SECRET_KEY not in caplog.text


# ---------------------------------------------------------------- inputs that change


def test_input_changed_between_plan_and_shard(s3_server, s3_family, tmp_path) -> None:
    base, experts, _, _ = s3_family
    refs = [s3_server.upload_dir(path, "models", f"changing/{path.name}") for path in [base, *experts]]
    plan = build_plan(parse_recipe(gta_recipe(METHOD, refs[0], refs[1:])), "s3://merges/changed", shards=2)
    prepare_output(plan)
    weights = (experts[0] / "model.safetensors").read_bytes()
    changed = weights[:-4] + bytes(b ^ 0xFF for b in weights[-4:])  # same size, other bytes
    s3_server.client().put_object(Bucket="models", Key="changing/expert1/model.safetensors", Body=changed)
    with pytest.raises(PlanError, match=r"input s3://models/changing/expert1 changed after planning \(model.safetensors: "
                       r"planned size \d+ ETag [0-9a-f]+, now size \d+ ETag [0-9a-f]+\)"):
        run_shard(plan, 0)
    assert not S3Output("s3://merges/changed").exists(plan.shards[0].file)


def test_object_replaced_or_deleted_during_the_merge(s3_server, s3_family) -> None:
    _, experts, _, _ = s3_family
    ref = s3_server.upload_dir(experts[0], "models", "replaced/expert1")
    source = ckpt.open_source(ref)
    assert source.read_range("model.safetensors", 0, 8)
    s3_server.client().put_object(Bucket="models", Key="replaced/expert1/model.safetensors", Body=b"x" * 100)
    with pytest.raises(CheckpointError, match=r"s3://models/replaced/expert1/model.safetensors changed during the merge"):
        source.read_range("model.safetensors", 8, 16)
    s3_server.client().delete_object(Bucket="models", Key="replaced/expert1/config.json")
    with pytest.raises(CheckpointError, match=r"cannot read s3://models/replaced/expert1/config.json: no such object \(NoSuchKey\)"):
        source.read_file("config.json")


# ---------------------------------------------------------------- errors


def test_access_denied_by_policy_and_by_wrong_keys(s3_server, s3_family) -> None:
    _, _, s3_base, s3_experts = s3_family
    iam = s3_server.client("iam")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="no-get", PolicyDocument=deny_policy("s3:GetObject", "s3:PutObject"))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    recipe = parse_recipe(gta_recipe(METHOD, s3_base, s3_experts))
    with s3_server.enforce_auth(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        patch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        with pytest.raises(CheckpointError) as caught:
            build_plan(recipe, "s3://merges/denied")
        message = str(caught.value)
        assert message.startswith("access denied: cannot read s3://models/tiny/base/config.json (AccessDenied)")
        assert "AWS_PROFILE" in message and key["SecretAccessKey"] not in message
        with pytest.raises(OutputError, match=r"access denied: cannot write s3://merges/denied/x.json \(AccessDenied\)"):
            ckpt.open_output("s3://merges/denied").write_file("x.json", b"{}")
        patch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
        with pytest.raises(CheckpointError, match=r"access denied: cannot list s3://models/tiny/base \(InvalidAccessKeyId\)"):
            build_plan(recipe, "s3://merges/denied")


def test_missing_bucket_prefix_object_and_unreachable_endpoint(s3_server, s3_family) -> None:
    with pytest.raises(CheckpointError, match="cannot list s3://no-such-bucket/m: the bucket 'no-such-bucket' does not exist"):
        ckpt.open_source("s3://no-such-bucket/m")
    with pytest.raises(CheckpointError, match="s3://models/nothing/here holds no objects"):
        ckpt.open_source("s3://models/nothing/here")
    with pytest.raises(CheckpointError, match="s3://models/tiny/base/config.json is an object; a checkpoint is the prefix"):
        ckpt.open_source("s3://models/tiny/base/config.json")
    with pytest.raises(CheckpointError, match="s3://models/tiny/base/tokenizer.json does not exist"):
        ckpt.open_source("s3://models/tiny/base").read_file("tokenizer.json")
    with pytest.raises(OutputError, match="cannot list s3://no-such-bucket/out: the bucket 'no-such-bucket' does not exist"):
        ckpt.open_output("s3://no-such-bucket/out").list_files()
    closed = StorageOptions(endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(CheckpointError, match=r"the S3 endpoint http://127.0.0.1:9 is unreachable .*fleet.storage.endpoint_url"):
        ckpt.open_source("s3://models/tiny/base", storage=closed)


def test_header_that_lies_about_its_length(s3_server, tmp_path) -> None:
    model = tmp_path / "liar"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    save_file({"w": torch.zeros(4096)}, model / "model.safetensors")
    data = bytearray((model / "model.safetensors").read_bytes())
    data[:8] = struct.pack("<Q", 10**9)  # a header length far past the file's end
    (model / "model.safetensors").write_bytes(data)
    ref = s3_server.upload_dir(model, "models", "liar")
    source = ckpt.open_source(ref)
    with pytest.raises(CheckpointError, match=r"header length 1000000000 points past the end of the \d+-byte file s3://models/liar/model.safetensors"):
        ckpt.read_header(source, "model.safetensors")
    assert source.bytes_read <= len(data)  # one ranged GET of at most 64 KiB; nothing sized from the lie

    header = json.dumps({"w": {"dtype": "F32", "shape": [4096], "data_offsets": [0, 10**6]}}).encode()
    header += b" " * (-len(header) % 8)
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4 * 4096))
    ref = s3_server.upload_dir(model, "models", "liar2")
    with pytest.raises(CheckpointError, match="s3://models/liar2/model.safetensors"):
        ckpt.read_tensor_index(ckpt.open_source(ref))


# ---------------------------------------------------------------- a killed shard


KILL_AFTER_BYTES = """
import os, signal, sys
from orchestrator.plan_ref import PlanRef, open_plan
from orchestrator.shard import run_shard

written = 0
def on_tensor(name, nbytes):
    global written
    written += nbytes
    if written > 6 * 2**20:  # the first 5 MiB part is on its way: die without any cleanup
        os.kill(os.getpid(), signal.SIGKILL)

run_shard(open_plan(PlanRef.locate(sys.argv[1])), 0, on_tensor=on_tensor)
"""


def test_killed_shard_leaves_no_object_and_the_rerun_aborts_its_upload(s3_server, tmp_path) -> None:
    shape = LlamaShape(hidden=256, layers=2, intermediate=1024, vocab=256, heads=4, kv_heads=2)
    weights = random_weights(shape, seed=5)
    paths = [save_checkpoint(tmp_path / "a", weights, shape), save_checkpoint(tmp_path / "b", fine_tuned(weights, seed=6), shape)]
    refs = [s3_server.upload_dir(path, "models", f"medium/{path.name}") for path in paths]
    data = {"merge_method": "linear", "models": [{"model": r, "parameters": {"weight": w}} for r, w in zip(refs, (0.3, 0.7))]}
    recipe = parse_recipe(data | {"fleet": {"storage": {"part_size": 5 * MiB}}})
    plan = build_plan(recipe, "s3://merges/killed")
    prepare_output(plan)
    sink = S3Output("s3://merges/killed")

    env = os.environ | {"PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_AFTER_BYTES), "s3://merges/killed"], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert plan.shards[0].file not in sink.list_files()
    assert [key for key, _ in sink.unfinished_uploads()] == [f"killed/{plan.shards[0].file}"]

    summary = merge(recipe, "s3://merges/killed")
    assert summary.shards_skipped == 0
    assert sink.unfinished_uploads() == []
    reference = merge(parse_recipe(gta_like_local(data, refs, paths)), str(tmp_path / "reference"))
    assert_same_tensors(read_tensors(s3_server.download("s3://merges/killed", tmp_path / "got")), read_tensors(tmp_path / "reference"))
    assert reference.shards == 1


def gta_like_local(data: dict, refs: list[str], paths: list[Path]) -> dict:
    """``data`` with each S3 reference replaced by its local copy."""
    local = dict(zip(refs, map(str, paths)))
    return data | {"models": [m | {"model": local[m["model"]]} for m in data["models"]]}


def test_multipart_upload_is_invisible_until_complete_and_aborted_on_error(s3_server) -> None:
    s3_server.bucket("merges")
    sink = S3Output("s3://merges/stream", options=StorageOptions(part_size=5 * MiB))
    blob = torch.randint(0, 256, (11 * MiB,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy().tobytes()
    with sink.open_write("big.bin") as stream:
        stream.write(memoryview(blob)[: 6 * MiB])
        assert not sink.exists("big.bin") and len(sink.unfinished_uploads()) == 1
        stream.write(memoryview(blob)[6 * MiB :])
    assert sink.read_file("big.bin") == blob and sink.unfinished_uploads() == []
    with pytest.raises(RuntimeError, match="boom"), sink.open_write("broken.bin") as stream:
        stream.write(blob)
        raise RuntimeError("boom")
    assert not sink.exists("broken.bin") and sink.unfinished_uploads() == []
    with sink.open_write("small.json") as stream:  # under one part: a single PUT
        stream.write(b"{}")
    assert sink.read_file("small.json") == b"{}" and sink.list_files() == ["big.bin", "small.json"]


# ---------------------------------------------------------------- reads: planning, read-ahead, retries, cache


def test_plan_requests_coalesces_neighbours_and_splits_large_ranges() -> None:
    ranges = [("a", 100, 200), ("a", 200, 300), ("a", 310, 400), ("b", 400, 500), ("a", 0, 100), ("a", 1000, 3500)]
    assert plan_requests(ranges, max_request=1000, max_gap=16, gap_fraction=0.01) == [
        ("a", 100, 400),  # a 10-byte hole spanned: within 1 % of the 3,310 bytes wanted
        ("b", 400, 500),
        ("a", 0, 100),  # behind the previous request: not merged, the reading order is kept
        ("a", 1000, 2000),
        ("a", 2000, 3000),
        ("a", 3000, 3500),
    ]
    assert plan_requests([("a", 0, 10), ("a", 20, 30)], max_request=100, gap_fraction=0.0) == [("a", 0, 10), ("a", 20, 30)]


def test_read_ahead_with_interleaved_windows_fetches_each_byte_once() -> None:
    data = bytes(range(256)) * 40
    fetched: list[tuple[int, int]] = []
    lock = threading.Lock()

    def fetch(file: str, begin: int, view: memoryview) -> None:
        view[:] = data[begin : begin + len(view)]
        with lock:
            fetched.append((begin, begin + len(view)))

    ranges = [("f", 0, 4000), ("f", 4000, 4100), ("f", 5000, 9000)]
    with ThreadPoolExecutor(2) as pool:
        ahead = ReadAhead(fetch, plan_requests(ranges, max_request=1000), budget=2000, pool=pool)

        def read(begin: int, end: int) -> None:
            out = bytearray(end - begin)
            assert ahead.serve("f", begin, memoryview(out))
            assert bytes(out) == data[begin:end]

        # a streaming method reads the first tensor in windows; the next ones are read whole meanwhile
        read(0, 1500)
        read(4000, 4100)
        read(1500, 3000)
        read(5000, 9000)
        read(3000, 4000)
        assert ahead.held_bytes == 0
        assert not ahead.serve("f", 0, memoryview(bytearray(10)))  # freed: the caller reads it directly
    assert sum(end - begin for begin, end in fetched) == 8100  # no byte twice
    spans = sorted(fetched)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_read_ahead_serves_chunked_reads_in_bounded_memory(s3_server, s3_family) -> None:
    _, experts, _, _ = s3_family
    options = StorageOptions(request_bytes=MiB, readahead_bytes=MiB)
    source = S3Checkpoint(s3_server.upload_dir(experts[0], "models", "readahead/e1"), options=options)
    size = source.size("model.safetensors")
    tensors, _ = ckpt.read_header(source, "model.safetensors")
    source.bytes_read = 0
    infos = sorted(tensors.values(), key=lambda t: t.begin)
    source.prefetch([(t.file, t.begin, t.end) for t in infos])
    local = ckpt.open_source(experts[0])
    for info in infos:  # whole tensors, and one in row chunks as a chunked method reads them
        if info.name.endswith("embed_tokens.weight"):
            parts = [read_rows(source, info, start, min(start + 10, info.shape[0])) for start in range(0, info.shape[0], 10)]
            assert torch.equal(torch.cat(parts), read_tensor(local, info))
        else:
            assert torch.equal(read_tensor(source, info), read_tensor(local, info))
    assert source.bytes_read == sum(t.nbytes for t in infos) <= size
    assert source._readahead is not None and source._readahead.held_bytes == 0
    assert source.requests <= 4  # coalesced: the whole file in a few GETs


def test_throttling_and_broken_responses_are_retried(s3_server, s3_family, s3_merge, tmp_path) -> None:
    _, _, s3_base, s3_experts = s3_family
    with FlakyProxy(s3_server.endpoint, throttle_every=20, cut_every=6) as proxy:
        storage = {"endpoint_url": proxy.endpoint, "max_attempts": 8}
        recipe = parse_recipe(gta_recipe(METHOD, s3_base, s3_experts, fleet={"storage": storage}))
        merge(recipe, "s3://merges/flaky", shards=1)
    assert proxy.throttled > 0 and proxy.cut > 0
    got = read_tensors(s3_server.download("s3://merges/flaky", tmp_path / "flaky"))
    assert_same_tensors(got, read_tensors(s3_merge["local"]))


def test_cache_dir_serves_the_same_inputs_again(s3_server, s3_family, s3_merge, tmp_path) -> None:
    _, _, s3_base, s3_experts = s3_family
    storage = {"cache_dir": str(tmp_path / "cache")}
    recipe = parse_recipe(gta_recipe(METHOD, s3_base, s3_experts, fleet={"storage": storage}))
    first = merge(recipe, "s3://merges/cached-1", shards=2)
    second = merge(recipe, "s3://merges/cached-2", shards=3)  # other shards, same bytes wanted
    plans = [open_plan(PlanRef.locate(f"s3://merges/cached-{i}")) for i in (1, 2)]
    receipts = [[Receipt.model_validate_json(S3Output(p.output).read_file(f".mergefleet/shard-{s.index}.json")) for s in p.shards] for p in plans]
    assert 0 < sum(r.bytes_read for r in receipts[0]) <= sum(r.tensor_bytes for r in receipts[0])  # planning cached some
    assert all(r.bytes_read == 0 for r in receipts[1])
    assert first.manifest.inputs == second.manifest.inputs
    got = read_tensors(s3_server.download("s3://merges/cached-2", tmp_path / "cached"))
    assert_same_tensors(got, read_tensors(s3_merge["local"]))
    assert any((tmp_path / "cache").glob("*.ranges"))
