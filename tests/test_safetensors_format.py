"""The safetensors format functions: golden bytes, the library's own files, and every
kind of corrupt header."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from orchestrator.errors import CheckpointError, MergeError, RecipeError
from orchestrator.storage.safetensors_format import (
    HEADER_LIMIT,
    aligned_order,
    build_header,
    dtype_code,
    header_length,
    parse_dtype_name,
    parse_header,
    torch_dtype,
)

# The whole prefix of a file holding a: F32 [2] and b: BF16 [1, 3]. 144 = 0x90 bytes of
# header: 142 bytes of JSON and two spaces of padding to a multiple of 8.
GOLDEN_PREFIX = (
    b"\x90\x00\x00\x00\x00\x00\x00\x00"
    b'{"__metadata__":{"format":"pt"},'
    b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
    b'"b":{"dtype":"BF16","shape":[1,3],"data_offsets":[8,14]}}'
    b"  "
)
GOLDEN_ENTRIES = [("a", "F32", [2]), ("b", "BF16", [1, 3])]


def header_of(entries: dict, metadata: dict | None = None) -> bytes:
    raw = dict(entries)
    if metadata is not None:
        raw["__metadata__"] = metadata
    return json.dumps(raw).encode()


# ---------------------------------------------------------------- golden bytes


def test_build_header_golden_bytes():
    prefix, offsets = build_header(GOLDEN_ENTRIES, {})
    assert prefix == GOLDEN_PREFIX
    assert offsets == [(0, 8), (8, 14)]


def test_build_header_matches_the_safetensors_library():
    tensors = {"a": torch.tensor([1.0, 2.0]), "b": torch.arange(3, dtype=torch.bfloat16).reshape(1, 3)}
    library = save(tensors, metadata={"format": "pt"})
    assert library[: len(GOLDEN_PREFIX)] == GOLDEN_PREFIX
    assert len(library) == len(GOLDEN_PREFIX) + 14


def test_build_header_pads_to_multiple_of_8_and_keeps_given_format():
    for name in ["x", "xy", "xyz", "wxyz", "vwxyz", "uvwxyz", "tuvwxyz", "stuvwxyz"]:
        prefix, _ = build_header([(name, "U8", [1])], {"format": "np", "k": "v"})
        (n,) = struct.unpack("<Q", prefix[:8])
        assert n == len(prefix) - 8 and n % 8 == 0
        assert json.loads(prefix[8:])["__metadata__"] == {"format": "np", "k": "v"}


def test_build_header_lays_tensors_out_in_given_order():
    _, offsets = build_header([("z", "BF16", [3]), ("a", "F32", [0]), ("m", "F64", [2, 2])], None)
    assert offsets == [(0, 6), (6, 6), (6, 38)]


@pytest.mark.parametrize(
    ("entries", "metadata", "match"),
    [
        ([("a", "F32", [1]), ("a", "F32", [1])], {}, "'a' is listed twice"),
        ([("a", "Q4", [1])], {}, "'a' has unknown dtype 'Q4'"),
        ([("a", "F32", [-1])], {}, "'a' has shape"),
        ([("__metadata__", "F32", [1])], {}, "cannot be written"),
        ([("a", "F32", [1])], {"n": 3}, "strings to strings"),
    ],
)
def test_build_header_rejects_bad_entries(entries, metadata, match):
    with pytest.raises(MergeError, match=match):
        build_header(entries, metadata)


def test_aligned_order_puts_wide_dtypes_first():
    entries = [("c", "U8", [3]), ("b", "F16", [1]), ("a", "F32", [1]), ("d", "F32", [2])]
    assert [e[0] for e in aligned_order(entries)] == ["a", "d", "b", "c"]


# ---------------------------------------------------------------- round trips with the library


def test_files_written_by_the_library_parse(tmp_path):
    tensors = {
        "w": torch.randn(4, 3),
        "h": torch.randn(5, dtype=torch.float64).to(torch.float16),
        "b": torch.tensor([True, False]),
        "s": torch.tensor(7, dtype=torch.int64),
        "e": torch.zeros(0, 2, dtype=torch.bfloat16),
    }
    path = tmp_path / "lib.safetensors"
    save_file(tensors, path, metadata={"k": "v"})
    data = path.read_bytes()
    n = header_length(data[:8], file_size=len(data), file_label=path.name)
    infos, metadata = parse_header(data[8 : 8 + n], data_size=len(data) - 8 - n, file_label=path.name)
    assert metadata == {"k": "v"}
    assert set(infos) == set(tensors)
    for name, tensor in tensors.items():
        info = infos[name]
        assert info.file == path.name
        assert torch_dtype(info.dtype) == tensor.dtype
        assert info.shape == tuple(tensor.shape)
        raw = bytearray(data[info.begin : info.end])
        got = torch.frombuffer(raw, dtype=torch.uint8).view(tensor.dtype).reshape(tensor.shape) if raw else None
        if got is not None:
            assert torch.equal(got, tensor)
        else:
            assert tensor.numel() == 0
    # ordered by offset, covering the data area exactly
    ordered = list(infos.values())
    assert ordered[0].begin == 8 + n and ordered[-1].end == len(data)


def test_prefix_we_build_plus_data_loads_in_the_library(tmp_path):
    tensors = {"z": torch.randn(2, 3).to(torch.bfloat16), "a": torch.arange(5, dtype=torch.int32)}
    entries = [(name, dtype_code(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    prefix, offsets = build_header(entries, {"plan": "abc"})
    body = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())
    assert offsets[-1][1] == len(body)
    path = tmp_path / "ours.safetensors"
    path.write_bytes(prefix + body)
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name in tensors:
        assert torch.equal(loaded[name], tensors[name])


# ---------------------------------------------------------------- header length


def test_header_length_ok():
    assert header_length(struct.pack("<Q", 16), file_size=24, file_label="f") == 16


def test_header_length_past_end_of_file():
    with pytest.raises(CheckpointError) as err:
        header_length(struct.pack("<Q", 123456789), file_size=2048, file_label="model.safetensors")
    assert str(err.value) == (
        "header length 123456789 points past the end of the 2048-byte file model.safetensors; "
        "the file is truncated or not safetensors"
    )


def test_header_length_over_limit():
    with pytest.raises(CheckpointError) as err:
        header_length(struct.pack("<Q", HEADER_LIMIT + 1), file_size=HEADER_LIMIT + 100, file_label="x.safetensors")
    assert str(err.value).startswith(
        "header length 100000001 of x.safetensors is over the 100000000-byte limit"
    )


def test_header_length_zero_and_too_short():
    with pytest.raises(CheckpointError, match="f.safetensors has a header length of 0"):
        header_length(bytes(8), file_size=100, file_label="f.safetensors")
    with pytest.raises(CheckpointError, match="f.safetensors is 5 bytes, too short"):
        header_length(b"\x01\x02\x03\x04\x05", file_size=5, file_label="f.safetensors")


# ---------------------------------------------------------------- corrupt headers


def test_header_not_json():
    with pytest.raises(CheckpointError, match="header of bad.safetensors is not valid JSON"):
        parse_header(b"{not json", data_size=0, file_label="bad.safetensors")
    with pytest.raises(CheckpointError, match="bad.safetensors is not valid JSON"):
        parse_header(b"\xff\xfe{}", data_size=0, file_label="bad.safetensors")
    with pytest.raises(CheckpointError, match="bad.safetensors is a JSON list"):
        parse_header(b"[1, 2]", data_size=0, file_label="bad.safetensors")


def test_duplicate_key_in_header():
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    with pytest.raises(CheckpointError, match=r"d\.safetensors is not valid JSON \(key 'a' appears twice\)"):
        parse_header(raw, data_size=2, file_label="d.safetensors")


def test_offsets_outside_data_area():
    raw = header_of({"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})
    with pytest.raises(CheckpointError) as err:
        parse_header(raw, data_size=16, file_label="m.safetensors")
    msg = str(err.value)
    assert "'w'" in msg and "m.safetensors" in msg and "outside the data area (0..16 bytes)" in msg


def test_offsets_reversed():
    raw = header_of({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})
    with pytest.raises(CheckpointError, match="'w' in m.safetensors has data_offsets \\[8, 4\\] outside"):
        parse_header(raw, data_size=16, file_label="m.safetensors")


def test_overlapping_offsets_name_both_tensors():
    raw = header_of(
        {
            "first": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "second": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
            "third": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]},
        }
    )
    with pytest.raises(CheckpointError) as err:
        parse_header(raw, data_size=20, file_label="o.safetensors")
    msg = str(err.value)
    assert "'first'" in msg and "'second'" in msg and "overlap in o.safetensors" in msg


def test_overlap_with_an_earlier_longer_tensor():
    # c starts after b ends but inside a, which reaches furthest
    raw = header_of(
        {
            "a": {"dtype": "U8", "shape": [10], "data_offsets": [0, 10]},
            "b": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},
            "c": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]},
        }
    )
    with pytest.raises(CheckpointError, match="'a'.*'c'.*overlap"):
        parse_header(raw, data_size=10, file_label="o.safetensors")


def test_unknown_dtype():
    raw = header_of({"q": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}})
    with pytest.raises(CheckpointError, match="tensor 'q' in u.safetensors has unknown dtype 'Q4_K'"):
        parse_header(raw, data_size=2, file_label="u.safetensors")


def test_shape_times_dtype_differs_from_byte_length():
    raw = header_of({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 10]}})
    with pytest.raises(CheckpointError) as err:
        parse_header(raw, data_size=16, file_label="s.safetensors")
    msg = str(err.value)
    assert "'w'" in msg and "s.safetensors" in msg and "12 bytes" in msg and "span 10 bytes" in msg


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": "F32", "shape": [1]}, "lacks data_offsets"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}, "has shape \\[-1\\]"),
        ({"dtype": "F32", "shape": [1.5], "data_offsets": [0, 6]}, "has shape"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "has shape"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "has data_offsets \\[0\\]"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}, "has data_offsets"),
        ([1, 2], "not an object"),
    ],
)
def test_malformed_entries(entry, match):
    with pytest.raises(CheckpointError, match=match) as err:
        parse_header(header_of({"t": entry}), data_size=8, file_label="e.safetensors")
    assert "'t'" in str(err.value) and "e.safetensors" in str(err.value)


@pytest.mark.parametrize("metadata", [{"n": 1}, ["x"], "s", ""])
def test_metadata_must_be_str_to_str(metadata):
    with pytest.raises(CheckpointError, match="__metadata__ of m.safetensors must map strings to strings"):
        parse_header(header_of({}, metadata), data_size=0, file_label="m.safetensors")


def test_parse_header_absolute_offsets_and_file_name():
    raw = header_of({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, {"format": "pt"})
    infos, metadata = parse_header(raw, data_size=12, file_label="/ckpt/x.safetensors", file="x.safetensors")
    info = infos["w"]
    assert (info.begin, info.end) == (8 + len(raw) + 4, 8 + len(raw) + 12)
    assert info.file == "x.safetensors" and info.nbytes == 8 and info.shape == (2,)
    assert metadata == {"format": "pt"}


# ---------------------------------------------------------------- dtypes


def test_dtype_mapping_round_trips_for_every_code():
    from orchestrator.storage.base import DTYPE_SIZES

    for code, size in DTYPE_SIZES.items():
        dtype = torch_dtype(code)
        assert dtype_code(dtype) == code
        assert torch.empty(0, dtype=dtype).element_size() == size


def test_dtype_errors_list_the_choices():
    with pytest.raises(CheckpointError, match="unknown safetensors dtype 'X'.*BF16"):
        torch_dtype("X")
    with pytest.raises(MergeError, match="cannot store dtype torch.complex64.*bfloat16"):
        dtype_code(torch.complex64)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("float32", torch.float32),
        ("float", torch.float32),
        ("FP32", torch.float32),
        ("torch.bfloat16", torch.bfloat16),
    ],
)
def test_parse_dtype_name(name, dtype):
    assert parse_dtype_name(name) == dtype


def test_parse_dtype_name_error_lists_allowed_names():
    with pytest.raises(RecipeError) as err:
        parse_dtype_name("int4")
    assert str(err.value) == (
        "unknown dtype 'int4'; use one of: bf16, bfloat16, float, float16, float32, fp16, fp32, half"
    )
