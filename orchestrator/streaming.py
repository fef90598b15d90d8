"""Tensors too large to hold: read from storage a window at a time while a method merges.

An embedding of 128k × 8192 in eight experts is 17 GB of bfloat16; the element-wise
methods only ever look at one chunk of the flattened tensor at a time, so they can be
handed a ``StoredTensor`` instead of a loaded one. It answers the few questions those
methods ask of their inputs (shape, dtype, device, ``numel``, a flat view, a slice of
elements) and reads each slice through a window of ``window_bytes``, so memory stays
bounded by the window times the number of inputs, whatever the tensor's size.
"""

from __future__ import annotations

import math

import torch

from orchestrator.storage.tensors import read_tensor
from orchestrator.storage.base import CheckpointSource, TensorInfo
from orchestrator.storage.safetensors_format import torch_dtype

WINDOW_BYTES = 32 << 20


class StoredTensor:
    """A tensor in a checkpoint, read on demand; slicing its flat view returns a real tensor."""

    def __init__(self, source: CheckpointSource, info: TensorInfo, *, window_bytes: int | None = None) -> None:
        self.source = source
        self.info = info
        self.shape = torch.Size(info.shape)
        self.dtype = torch_dtype(info.dtype)
        self.device = torch.device("cpu")
        self._itemsize = torch.empty((), dtype=self.dtype).element_size()
        self._window_elements = max(1, (window_bytes or WINDOW_BYTES) // self._itemsize)
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
