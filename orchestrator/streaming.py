"""Tensors too large to hold: read from storage a window at a time while a method merges.

An embedding of 128k × 8192 in eight experts is 17 GB of bfloat16; the element-wise
methods only ever look at one chunk of the flattened tensor at a time, so they can be
handed a ``StoredTensor`` instead of a loaded one. It answers the few questions those
methods ask of their inputs (shape, dtype, device, ``numel``, a flat view, a slice of
elements) and reads each slice through a window of ``window_bytes``, so memory stays
bounded by the window times the number of inputs, whatever the tensor's size.

``StreamingPolicy`` says which tensors stream; a shard runner passes one to every shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from orchestrator.storage.base import CheckpointSource, TensorInfo
from orchestrator.storage.safetensors_format import torch_dtype
from orchestrator.storage.tensors import read_tensor

if TYPE_CHECKING:
    from orchestrator.methods.base import MethodSpec
    from orchestrator.plan import PlannedTensor


@dataclass(frozen=True)
class StreamingPolicy:
    """When a tensor's inputs are read a window at a time instead of loaded whole.

    A method that declares ``streams_inputs`` streams a tensor on the CPU once its inputs
    exceed ``threshold_bytes`` together (vocabulary tensors, permuted row by row, never do).
    """

    threshold_bytes: int = 2 << 30
    window_bytes: int = 32 << 20

    def __post_init__(self) -> None:
        if self.threshold_bytes < 0 or self.window_bytes < 1:
            raise ValueError(f"a streaming threshold of {self.threshold_bytes} bytes and window of {self.window_bytes} bytes")

    def streams(self, method: "MethodSpec", tensor: "PlannedTensor", device: str) -> bool:
        return method.streams_inputs and device == "cpu" and not tensor.vocab and tensor.in_bytes > self.threshold_bytes


class StoredTensor:
    """A tensor in a checkpoint, read on demand; slicing its flat view returns a real tensor."""

    def __init__(self, source: CheckpointSource, info: TensorInfo, *, window_bytes: int) -> None:
        self.source = source
        self.info = info
        self.shape = torch.Size(info.shape)
        self.dtype = torch_dtype(info.dtype)
        self.device = torch.device("cpu")
        self._itemsize = torch.empty((), dtype=self.dtype).element_size()
        self._window_elements = max(1, window_bytes // self._itemsize)
        self._window: torch.Tensor | None = None
        self._window_start = 0
        self._flat = False

    def numel(self) -> int:
        return math.prod(self.info.shape)

    def dim(self) -> int:
        return len(self.shape)

    def reshape(self, *shape: int) -> "StoredTensor":
        """Only the flat view (-1) is supported: that is all the streaming methods use."""
        if tuple(shape) not in ((-1,), (self.numel(),)):
            raise NotImplementedError(f"a StoredTensor only offers its flat view, not {shape}")
        flat = StoredTensor.__new__(StoredTensor)
        flat.__dict__.update(self.__dict__)
        flat.shape = torch.Size((self.numel(),))
        flat._flat = True
        return flat

    view = reshape

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not (self._flat and isinstance(index, slice) and index.step in (None, 1)):
            raise NotImplementedError("a StoredTensor is read through contiguous slices of its flat view")
        start, stop, _ = index.indices(self.numel())
        if stop <= start:
            return torch.empty(0, dtype=self.dtype)
        window = self._window
        if window is None or start < self._window_start or stop > self._window_start + window.numel():
            self._load(start, stop)
        offset = start - self._window_start
        return self._window[offset : offset + (stop - start)]  # type: ignore[index]

    def _load(self, start: int, stop: int) -> None:
        length = max(stop - start, min(self._window_elements, self.numel() - start))
        begin = self.info.begin + start * self._itemsize
        part = TensorInfo(self.info.name, self.info.dtype, (length,), self.info.file, begin, begin + length * self._itemsize)
        self._window = None  # let the old window go before the new one is read
        self._window = read_tensor(self.source, part)
        self._window_start = start

    def to(self, dtype: torch.dtype, copy: bool = False) -> torch.Tensor:  # noqa: ARG002 - torch's signature
        """The whole tensor, loaded: only for the rare path that needs it all."""
        return read_tensor(self.source, self.info).to(dtype, copy=True)

    def __repr__(self) -> str:
        return f"StoredTensor({self.info.name!r}, {self.info.dtype}, {list(self.info.shape)})"
