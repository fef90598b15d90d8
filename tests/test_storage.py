"""Local storage and format-agnostic checkpoint reading and writing."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from orchestrator.errors import CheckpointError, MergeError, OutputError
from orchestrator.storage import checkpoint as ckpt
from orchestrator.storage.base import StorageOptions
from orchestrator.storage.checkpoint import (
    fingerprints,
    open_output,
    open_source,
    pickle_weight_files,
    read_config,
    read_header,
    read_tensor_index,
    weight_files,
)
from orchestrator.storage.convert import convert_pickle_checkpoint, open_checkpoint
from orchestrator.storage.local import LocalCheckpoint, LocalOutput
from orchestrator.storage.safetensors_format import aligned_order, dtype_code
from orchestrator.storage.tensors import read_rows, read_tensor
from orchestrator.storage.writer import SafetensorsWriter, check_tensor_for_write, write_safetensors

PICKLE_MESSAGE = (
    "{path} holds only a pickle checkpoint ({file}); pickle can run code when loaded. "
    "Convert it to safetensors, or pass --allow-pickle to load it with "
    "torch.load(weights_only=True)"
)


def tensors_a() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "layers.0.weight": torch.randn(4, 4, generator=g),
        "layers.0.bias": torch.randn(4, generator=g).to(torch.float16),
        "norm.weight": torch.ones(4),
    }


def write_config(directory: Path) -> None:
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))


def single_checkpoint(directory: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors or tensors_a(), directory / "model.safetensors", metadata={"format": "pt"})
    write_config(directory)
    return directory


def sharded_checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = tensors_a()
    names = list(tensors)
    parts = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    weight_map = {}
    for file, part in parts.items():
        save_file({n: tensors[n] for n in part}, directory / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    write_config(directory)
    return directory


class SpySource:
    """A CheckpointSource without read_range_into that records every ranged read."""

    def __init__(self, inner: LocalCheckpoint) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.bytes_read = 0
        self.reads: list[tuple[str, int, int]] = []

    def list_files(self):
        return self.inner.list_files()

    def exists(self, file):
        return self.inner.exists(file)

    def size(self, file):
        return self.inner.size(file)

    def fingerprint(self, file):
        return self.inner.fingerprint(file)

    def read_range(self, file, begin, end):
        self.reads.append((file, begin, end))
        self.bytes_read += end - begin
        return self.inner.read_range(file, begin, end)

    def read_file(self, file):
        return self.inner.read_file(file)


# ---------------------------------------------------------------- LocalCheckpoint


def test_local_checkpoint_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint directory {tmp_path / 'nope'} does not exist"):
        LocalCheckpoint(tmp_path / "nope")
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'f'} is a file"):
        LocalCheckpoint(tmp_path / "f")


def test_local_checkpoint_reads_ranges_and_counts(tmp_path):
    (tmp_path / "blob").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.json").write_text("{}")
    with LocalCheckpoint(tmp_path) as source:
        assert source.list_files() == ["blob", "sub/x.json"]
        assert source.exists("blob") and not source.exists("missing") and not source.exists("sub")
        assert source.size("blob") == 1024
        assert source.read_range("blob", 10, 14) == bytes([10, 11, 12, 13])
        assert source.read_range("blob", 5, 5) == b""
        buffer = bytearray(3)
        assert source.read_range_into("blob", 256 + 1, memoryview(buffer)) == 3
        assert bytes(buffer) == bytes([1, 2, 3])
        assert source.read_file("sub/x.json") == b"{}"
        assert source.bytes_read == 4 + 3 + 2
        fp = source.fingerprint("blob")
        assert fp.file == "blob" and fp.size == 1024
        assert fp.version == f"mtime_ns:{(tmp_path / 'blob').stat().st_mtime_ns}"


def test_local_checkpoint_missing_file_and_short_read(tmp_path):
    (tmp_path / "short").write_bytes(b"12345")
    source = LocalCheckpoint(tmp_path)
    for call in (lambda: source.size("gone"), lambda: source.fingerprint("gone"), lambda: source.read_range("gone", 0, 1)):
        with pytest.raises(CheckpointError, match=f"{tmp_path / 'gone'} does not exist"):
            call()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'short'} ended at byte 5 while reading bytes 2..9"):
        source.read_range("short", 2, 9)
    with pytest.raises(CheckpointError, match="ended at byte 5"):
        source.read_range_into("short", 3, memoryview(bytearray(4)))
    with pytest.raises(CheckpointError, match="not a relative file name"):
        source.read_file("../etc/passwd")


# ---------------------------------------------------------------- LocalOutput


def test_output_open_write_is_atomic_and_creates_folders(tmp_path):
    sink = LocalOutput(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # opening has no side effect
    assert sink.list_files() == []
    with sink.open_write(".mergefleet/plan.json") as stream:
        stream.write(b"{")
        assert not (tmp_path / "out/.mergefleet/plan.json").exists()
        assert sink.list_files() == []  # the temp file is not listed
        stream.write(b"}")
    assert (tmp_path / "out/.mergefleet/plan.json").read_bytes() == b"{}"
    assert sink.exists(".mergefleet/plan.json")
    assert sink.read_file(".mergefleet/plan.json") == b"{}"
    sink.write_file("a.txt", b"one")
    sink.write_file("a.txt", b"two")  # replaces
    assert sink.read_file("a.txt") == b"two"
    assert sink.list_files() == [".mergefleet/plan.json", "a.txt"]
    sink.delete("a.txt")
    sink.delete("a.txt")
    assert sink.list_files() == [".mergefleet/plan.json"]
    with pytest.raises(OutputError, match="does not exist"):
        sink.read_file("a.txt")


def test_output_failed_write_leaves_nothing(tmp_path):
    sink = LocalOutput(tmp_path)
    sink.write_file("keep.bin", b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with sink.open_write("keep.bin") as stream:
            stream.write(b"new and partial")
            raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt):
        with sink.open_write("fresh.bin") as stream:
            stream.write(b"partial")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin"]
    assert (tmp_path / "keep.bin").read_bytes() == b"old"


def test_output_remove_partials_removes_only_dead_writers_files_and_bad_paths(tmp_path):
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that has exited (its number is not reused this soon)
    host = socket.gethostname()
    (tmp_path / ".mergefleet").mkdir()
    (tmp_path / "nested").mkdir()
    gone = [f"shard.safetensors.partial-{dead.pid}-{host}-00112233aabb", f".mergefleet/shard-0.json.partial-{dead.pid}-{host}-00112233aabb"]
    kept = [
        f"live.safetensors.partial-{os.getpid()}-{host}-00112233aabb",  # a live writer's
        f"far.safetensors.partial-{dead.pid}-elsewhere-00112233aabb",  # another host's
        "user.safetensors.partial-abc123",  # not named by mergefleet
        f"nested/inner.safetensors.partial-{dead.pid}-{host}-00112233aabb",  # an output nested inside
    ]
    for name in [*gone, *kept, "done.json"]:
        (tmp_path / name).write_bytes(b"x")
    sink = LocalOutput(tmp_path)
    assert sink.list_files() == ["done.json"]
    sink.remove_partials()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted([*kept, "done.json"])
    for bad in ("/abs", "../up", ""):
        with pytest.raises(OutputError, match="not a relative file name"):
            sink.write_file(bad, b"")
    with pytest.raises(OutputError, match="is a file"):
        LocalOutput(tmp_path / "done.json")


# ---------------------------------------------------------------- opening references


def test_open_source_and_output(tmp_path):
    assert isinstance(open_source(str(single_checkpoint(tmp_path / "m"))), LocalCheckpoint)
    assert isinstance(open_output(tmp_path / "o"), LocalOutput)
    from orchestrator.storage.s3.sink import S3Output

    sink = open_output("s3://bucket/out/", storage=StorageOptions(endpoint_url="http://127.0.0.1:9"))
    assert isinstance(sink, S3Output) and sink.uri == "s3://bucket/out"  # opening sends no request
    with pytest.raises(CheckpointError, match="not a valid bucket name"):
        open_source("s3://B/model")
    with pytest.raises(CheckpointError, match="unsupported scheme 'hf'"):
        open_source("hf://org/model")


# ---------------------------------------------------------------- which files


def test_weight_files_single_sharded_and_loose(tmp_path):
    assert weight_files(LocalCheckpoint(single_checkpoint(tmp_path / "one"))) == ["model.safetensors"]
    assert weight_files(LocalCheckpoint(sharded_checkpoint(tmp_path / "two"))) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    loose = tmp_path / "loose"
    loose.mkdir()
    save_file({"w": torch.zeros(1)}, loose / "b.safetensors")
    save_file({"v": torch.zeros(1)}, loose / "a.safetensors")
    assert weight_files(LocalCheckpoint(loose)) == ["a.safetensors", "b.safetensors"]


def test_sharded_index_pointing_at_missing_file(tmp_path):
    directory = sharded_checkpoint(tmp_path / "m")
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        weight_files(LocalCheckpoint(directory))
    msg = str(err.value)
    assert f"{directory}/model.safetensors.index.json" in msg
    assert "model-00002-of-00002.safetensors, which is missing" in msg


def test_bad_index_files(tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    index = directory / "model.safetensors.index.json"
    index.write_text("{oops")
    with pytest.raises(CheckpointError, match=f"{index} is not valid JSON"):
        weight_files(LocalCheckpoint(directory))
    index.write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=f'{index} has no "weight_map"'):
        weight_files(LocalCheckpoint(directory))


def test_no_weights_at_all(tmp_path):
    write_config(tmp_path)
    with pytest.raises(CheckpointError, match=f"{tmp_path} holds no weights.*it holds config.json"):
        weight_files(LocalCheckpoint(tmp_path))


def pickle_checkpoint(directory: Path, *, sharded: bool = False) -> dict[str, torch.Tensor]:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = tensors_a()
    tensors["lm_head.weight"] = tensors["embed.weight"]  # tied: shares storage
    if sharded:
        names = list(tensors)
        files = {"pytorch_model-00001-of-00002.bin": names[:3], "pytorch_model-00002-of-00002.bin": names[3:]}
        for file, part in files.items():
            torch.save({n: tensors[n] for n in part}, directory / file)
        weight_map = {n: f for f, part in files.items() for n in part}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(tensors, directory / "pytorch_model.bin")
    torch.save({"lr": 0.1}, directory / "training_args.bin")
    write_config(directory)
    (directory / "tokenizer.json").write_text('{"version": "1.0"}')
    return tensors


def test_pickle_only_checkpoint_is_refused(tmp_path):
    pickle_checkpoint(tmp_path / "p")
    source = LocalCheckpoint(tmp_path / "p")
    assert pickle_weight_files(source) == ["pytorch_model.bin"]
    with pytest.raises(CheckpointError) as err:
        weight_files(source)
    assert str(err.value) == PICKLE_MESSAGE.format(path=tmp_path / "p", file="pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path / "p", scratch=tmp_path / "scratch")
    assert "holds only a pickle checkpoint" in str(err.value)
    assert not (tmp_path / "scratch").exists()

    pickle_checkpoint(tmp_path / "ps", sharded=True)
    with pytest.raises(CheckpointError) as err:
        weight_files(LocalCheckpoint(tmp_path / "ps"))
    assert str(err.value) == PICKLE_MESSAGE.format(path=tmp_path / "ps", file="pytorch_model.bin.index.json")

    other = tmp_path / "pt"
    other.mkdir()
    torch.save({"w": torch.zeros(2)}, other / "weights.pt")
    with pytest.raises(CheckpointError, match=r"holds only a pickle checkpoint \(weights.pt\)"):
        weight_files(LocalCheckpoint(other))


@pytest.mark.parametrize("sharded", [False, True])
def test_pickle_checkpoint_converted_when_allowed(tmp_path, sharded):
    tensors = pickle_checkpoint(tmp_path / "p", sharded=sharded)
    converted = convert_pickle_checkpoint(LocalCheckpoint(tmp_path / "p"), tmp_path / "c")
    assert isinstance(converted, LocalCheckpoint)
    files = weight_files(converted)
    if sharded:
        assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    else:
        assert files == ["model.safetensors"]
    loaded = {}
    for file in files:
        loaded.update(load_file(tmp_path / "c" / file))  # the safetensors library reads our files
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
    index = read_tensor_index(converted)
    for name, tensor in tensors.items():
        assert torch.equal(read_tensor(converted, index[name]), tensor)
    assert read_config(converted) == {"architectures": ["LlamaForCausalLM"]}
    assert (tmp_path / "c" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert not (tmp_path / "c" / "training_args.bin").exists()
    assert not any(p.suffix == ".bin" for p in (tmp_path / "c").iterdir())


def test_open_checkpoint_converts_once_into_scratch(tmp_path):
    tensors = pickle_checkpoint(tmp_path / "p")
    scratch = tmp_path / "scratch"
    first = open_checkpoint(tmp_path / "p", allow_pickle=True, scratch=scratch)
    assert Path(first.uri).parent == scratch
    index = read_tensor_index(first)
    assert torch.equal(read_tensor(first, index["layers.0.weight"]), tensors["layers.0.weight"])
    mtime = (Path(first.uri) / "model.safetensors").stat().st_mtime_ns
    second = open_checkpoint(tmp_path / "p", allow_pickle=True, scratch=scratch)
    assert second.uri == first.uri
    assert (Path(second.uri) / "model.safetensors").stat().st_mtime_ns == mtime  # reused
    # a safetensors checkpoint is returned as is
    plain = open_checkpoint(single_checkpoint(tmp_path / "s"), allow_pickle=True, scratch=scratch)
    assert plain.uri == str(tmp_path / "s")


def test_pickle_with_arbitrary_objects_is_refused_even_when_allowed(tmp_path):
    directory = tmp_path / "evil"
    directory.mkdir()
    torch.save({"w": torch.zeros(1), "obj": Path("x")}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        convert_pickle_checkpoint(LocalCheckpoint(directory), tmp_path / "c")
    assert f"{directory}/pytorch_model.bin could not be loaded with torch.load(weights_only=True)" in str(err.value)
    assert not (tmp_path / "c" / "model.safetensors").exists()
    torch.save({"w": torch.zeros(1), "step": 3}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: entry 'step' is a int"):
        convert_pickle_checkpoint(LocalCheckpoint(directory), tmp_path / "c")


# ---------------------------------------------------------------- headers and the tensor index


def test_read_tensor_index_single_and_sharded(tmp_path):
    tensors = tensors_a()
    for directory in (single_checkpoint(tmp_path / "one"), sharded_checkpoint(tmp_path / "two")):
        source = LocalCheckpoint(directory)
        index = read_tensor_index(source)
        assert set(index) == set(tensors)
        for name, tensor in tensors.items():
            info = index[name]
            assert info.shape == tuple(tensor.shape)
            assert info.nbytes == tensor.numel() * tensor.element_size()
            assert torch.equal(read_tensor(source, info), tensor)
    assert index["norm.weight"].file == "model-00002-of-00002.safetensors"


def test_read_header_uses_at_most_two_reads(tmp_path):
    small = single_checkpoint(tmp_path / "small")
    spy = SpySource(LocalCheckpoint(small))
    read_header(spy, "model.safetensors")
    assert len(spy.reads) == 1
    # a header longer than the first read (64 KiB) takes exactly one more read
    many = {f"layer.{i:05d}.a_rather_long_parameter_name.weight": torch.zeros(1) for i in range(1500)}
    big = single_checkpoint(tmp_path / "big", many)
    spy = SpySource(LocalCheckpoint(big))
    infos, metadata = read_header(spy, "model.safetensors")
    assert len(infos) == 1500 and metadata == {"format": "pt"}
    (n,) = struct.unpack("<Q", (big / "model.safetensors").read_bytes()[:8])
    assert n > ckpt.FIRST_READ
    assert spy.reads == [("model.safetensors", 0, ckpt.FIRST_READ), ("model.safetensors", ckpt.FIRST_READ, 8 + n)]


def test_truncated_file(tmp_path):
    directory = single_checkpoint(tmp_path / "m")
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(CheckpointError) as err:
        read_tensor_index(LocalCheckpoint(directory))
    msg = str(err.value)
    assert f"{path}" in msg and "outside the data area" in msg and "truncated" in msg
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=f"{path} is 5 bytes, too short"):
        read_tensor_index(LocalCheckpoint(directory))


def test_header_length_past_end_of_file(tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    path = directory / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 123456789) + b" " * 2040)
    with pytest.raises(CheckpointError) as err:
        read_tensor_index(LocalCheckpoint(directory))
    assert str(err.value) == (
        f"header length 123456789 points past the end of the 2048-byte file {path}; "
        "the file is truncated or not safetensors"
    )


def test_header_not_json_in_a_file(tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    body = b"this is not json"
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CheckpointError, match=f"header of {directory}/model.safetensors is not valid JSON"):
        read_tensor_index(LocalCheckpoint(directory))


def test_duplicate_tensor_across_files_names_both(tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    save_file({"w": torch.zeros(2)}, directory / "a.safetensors")
    save_file({"w": torch.ones(2)}, directory / "b.safetensors")
    with pytest.raises(CheckpointError) as err:
        read_tensor_index(LocalCheckpoint(directory))
    msg = str(err.value)
    assert "'w'" in msg and f"{directory}/a.safetensors" in msg and f"{directory}/b.safetensors" in msg


def test_index_and_headers_must_agree(tmp_path):
    directory = sharded_checkpoint(tmp_path / "m")
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        read_tensor_index(LocalCheckpoint(directory))
    msg = str(err.value)
    assert "'ghost.weight'" in msg and "model-00001-of-00002.safetensors has no such tensor" in msg
    assert f"{index_path}" in msg

    del index["weight_map"]["ghost.weight"]
    del index["weight_map"]["norm.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        read_tensor_index(LocalCheckpoint(directory))
    msg = str(err.value)
    assert "'norm.weight'" in msg and "model-00002-of-00002.safetensors" in msg and "does not list it" in msg


def test_read_config(tmp_path):
    directory = single_checkpoint(tmp_path / "m")
    assert read_config(LocalCheckpoint(directory)) == {"architectures": ["LlamaForCausalLM"]}
    (directory / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match=f"{directory}/config.json is not valid JSON"):
        read_config(LocalCheckpoint(directory))
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"{directory}/config.json is missing"):
        read_config(LocalCheckpoint(directory))


def test_fingerprints(tmp_path):
    one = LocalCheckpoint(single_checkpoint(tmp_path / "one"))
    assert [fp.file for fp in fingerprints(one)] == ["config.json", "model.safetensors"]
    two = LocalCheckpoint(sharded_checkpoint(tmp_path / "two"))
    assert [fp.file for fp in fingerprints(two)] == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]


# ---------------------------------------------------------------- reading tensor data


def test_read_tensor_reads_exactly_the_tensors_bytes(tmp_path):
    tensors = tensors_a()
    source = LocalCheckpoint(single_checkpoint(tmp_path / "m", tensors))
    index = read_tensor_index(source)
    for name, tensor in tensors.items():
        info = index[name]
        before = source.bytes_read
        got = read_tensor(source, info)
        assert source.bytes_read - before == info.nbytes == tensor.numel() * tensor.element_size()
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)
    # through a backend without read_range_into: one read, of exactly [begin, end)
    spy = SpySource(LocalCheckpoint(tmp_path / "m"))
    info = index["layers.0.weight"]
    assert torch.equal(read_tensor(spy, info), tensors["layers.0.weight"])
    assert spy.reads == [("model.safetensors", info.begin, info.end)]


def test_read_tensor_into_out_and_rows(tmp_path):
    tensors = {"w": torch.arange(24, dtype=torch.float32).reshape(6, 4), "s": torch.tensor(2.5), "e": torch.zeros(0, 3)}
    source = LocalCheckpoint(single_checkpoint(tmp_path / "m", tensors))
    index = read_tensor_index(source)
    out = torch.empty(6, 4)
    assert read_tensor(source, index["w"], out=out) is out
    assert torch.equal(out, tensors["w"])
    assert torch.equal(read_tensor(source, index["s"]), tensors["s"])
    assert read_tensor(source, index["e"]).shape == (0, 3)
    before = source.bytes_read
    rows = read_rows(source, index["w"], 2, 5)
    assert torch.equal(rows, tensors["w"][2:5])
    assert source.bytes_read - before == 3 * 4 * 4
    with pytest.raises(ValueError, match="needs torch.float32 \\(6, 4\\)"):
        read_tensor(source, index["w"], out=torch.empty(6, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="outside tensor 'w'"):
        read_rows(source, index["w"], 4, 7)


# ---------------------------------------------------------------- writing


def entries_of(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(name, dtype_code(t.dtype), tuple(t.shape)) for name, t in tensors.items()]


def test_write_safetensors_round_trip(tmp_path):
    tensors = tensors_a()
    sink = LocalOutput(tmp_path / "out")
    digest, written = write_safetensors(
        sink, "model-00001-of-00001.safetensors", entries_of(tensors), iter(tensors.items()), metadata={"plan": "p1"}
    )
    path = tmp_path / "out" / "model-00001-of-00001.safetensors"
    data = path.read_bytes()
    assert written == len(data)
    assert digest == hashlib.sha256(data).hexdigest()
    loaded = load_file(path)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    infos, metadata = read_header(LocalCheckpoint(tmp_path / "out"), path.name)
    assert metadata == {"format": "pt", "plan": "p1"}
    assert list(infos) == list(tensors)  # laid out in the given order
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [path.name]


def test_writer_accepts_non_contiguous_tensors(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    transposed = base.t()
    assert not transposed.is_contiguous()
    sink = LocalOutput(tmp_path)
    with SafetensorsWriter(sink, "t.safetensors", [("t", "F32", (4, 3))]) as writer:
        writer.write("t", transposed)
    assert writer.bytes_written == (tmp_path / "t.safetensors").stat().st_size
    assert torch.equal(load_file(tmp_path / "t.safetensors")["t"], transposed)


def test_writer_whose_producer_raises_leaves_nothing(tmp_path):
    tensors = tensors_a()

    def producer():
        items = iter(tensors.items())
        yield next(items)
        yield next(items)
        raise RuntimeError("producer failed")

    sink = LocalOutput(tmp_path / "out")
    with pytest.raises(RuntimeError, match="producer failed"):
        write_safetensors(sink, "shard.safetensors", entries_of(tensors), producer())
    assert list((tmp_path / "out").iterdir()) == []


def test_writer_refuses_nan_and_leaves_nothing(tmp_path):
    sink = LocalOutput(tmp_path)
    bad = torch.tensor([1.0, float("nan"), float("inf")], dtype=torch.bfloat16)
    with pytest.raises(MergeError) as err:
        write_safetensors(
            sink, "m.safetensors", [("ok", "F32", (1,)), ("model.layers.3.mlp.weight", "BF16", (3,))],
            [("ok", torch.zeros(1)), ("model.layers.3.mlp.weight", bad)],
        )
    assert str(err.value) == (
        "merged tensor 'model.layers.3.mlp.weight' contains NaN/Inf (2 of 3 values); "
        "check the inputs and parameters (e.g. weights summing to 0 with normalize)"
    )
    assert list(tmp_path.iterdir()) == []


def test_writer_incomplete_or_out_of_order(tmp_path):
    sink = LocalOutput(tmp_path)
    entries = [("a", "F32", (1,)), ("b", "F32", (1,))]
    with pytest.raises(MergeError, match=r"m.safetensors is incomplete: 1 tensor\(s\) were not written, starting with 'b'"):
        with SafetensorsWriter(sink, "m.safetensors", entries) as writer:
            writer.write("a", torch.zeros(1))
    with pytest.raises(MergeError, match="got tensor 'b' but the header's next tensor is 'a'"):
        with SafetensorsWriter(sink, "m.safetensors", entries) as writer:
            writer.write("b", torch.zeros(1))
    assert list(tmp_path.iterdir()) == []


def test_check_tensor_for_write():
    with pytest.raises(MergeError, match=r"merged tensor 'w' is torch.float32 but the file declares torch.bfloat16; cast it with .to\(torch.bfloat16\)"):
        check_tensor_for_write("w", torch.zeros(2), "BF16", (2,))
    with pytest.raises(MergeError, match=r"merged tensor 'w' has shape \(2,\) but the file declares \(1, 2\)"):
        check_tensor_for_write("w", torch.zeros(2), torch.float32, (1, 2))
    with pytest.raises(MergeError, match="'w' contains NaN/Inf"):
        check_tensor_for_write("w", torch.tensor([float("-inf")]), "F32", (1,))
    with pytest.raises(MergeError, match="'f8' contains NaN/Inf"):
        check_tensor_for_write("f8", torch.tensor([float("nan")]).to(torch.float8_e4m3fn), "F8_E4M3", (1,))
    ints = check_tensor_for_write("i", torch.arange(6).reshape(2, 3).t(), "I64", (3, 2))
    assert ints.is_contiguous()
    huge = torch.full((4,), 3e38)  # finite, though its sum overflows
    assert torch.equal(check_tensor_for_write("h", huge, "F32", (4,)), huge)
    assert check_tensor_for_write("e", torch.zeros(0, 3), "F32", (0, 3)).numel() == 0
    with pytest.raises(MergeError, match=r"'n' contains NaN/Inf \(2 of 4 values\)"):
        check_tensor_for_write("n", torch.tensor([1.0, float("inf"), float("-inf"), 2.0]).bfloat16(), "BF16", (4,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_bad_value_anywhere_in_a_large_tensor_is_found(dtype: torch.dtype, bad: float) -> None:
    """The finiteness check runs vectorised over millions of values: one bad value in any
    lane of any block, among values near the dtype's largest, is still refused."""
    generator = torch.Generator().manual_seed(3)
    tensor = (torch.rand(1_000_003, generator=generator) * 2 - 1).to(dtype) * torch.finfo(dtype).max
    assert torch.equal(check_tensor_for_write("ok", tensor, dtype, tensor.shape), tensor)
    for position in (0, 17, 500_001, 1_000_002):
        broken = tensor.clone()
        broken[position] = bad
        with pytest.raises(MergeError, match=r"'w' contains NaN/Inf \(1 of 1000003 values\)"):
            check_tensor_for_write("w", broken, dtype, tensor.shape)


def test_files_we_write_load_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=32, max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}  # untied copies
    entries = aligned_order(entries_of(state))
    write_safetensors(LocalOutput(tmp_path / "m"), "model.safetensors", entries, ((n, state[n]) for n, _, _ in entries))
    config.save_pretrained(tmp_path / "m")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
