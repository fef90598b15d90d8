"""Where checkpoints are read from and merges are written to.

``open_source``/``open_output`` turn a reference (a local path or ``s3://bucket/prefix``)
into a ``CheckpointSource``/``OutputSink``; the functions below work on any backend.
"""

from orchestrator.storage.base import (
    DTYPE_SIZES,
    CheckpointSource,
    FileFingerprint,
    OutputSink,
    StorageOptions,
    TensorInfo,
)
from orchestrator.storage.checkpoint import (
    SafetensorsWriter,
    check_tensor_for_write,
    convert_pickle_checkpoint,
    fingerprints,
    open_checkpoint,
    open_output,
    open_source,
    pickle_weight_files,
    prefetch,
    read_config,
    read_header,
    read_rows,
    read_tensor,
    read_tensor_index,
    read_weight_map,
    weight_files,
    write_safetensors,
)
from orchestrator.storage.local import LocalCheckpoint, LocalOutput
from orchestrator.storage.safetensors_format import (
    aligned_order,
    build_header,
    dtype_code,
    header_length,
    parse_dtype_name,
    parse_header,
    torch_dtype,
)

__all__ = [
    "DTYPE_SIZES",
    "CheckpointSource",
    "FileFingerprint",
    "LocalCheckpoint",
    "LocalOutput",
    "OutputSink",
    "SafetensorsWriter",
    "StorageOptions",
    "TensorInfo",
    "aligned_order",
    "build_header",
    "check_tensor_for_write",
    "convert_pickle_checkpoint",
    "dtype_code",
    "fingerprints",
    "header_length",
    "open_checkpoint",
    "open_output",
    "open_source",
    "parse_dtype_name",
    "parse_header",
    "pickle_weight_files",
    "prefetch",
    "read_config",
    "read_header",
    "read_rows",
    "read_tensor",
    "read_tensor_index",
    "read_weight_map",
    "torch_dtype",
    "weight_files",
    "write_safetensors",
]
