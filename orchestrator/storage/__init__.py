"""Where checkpoints are read from and merges are written to.

- ``base``: the interface every backend implements (``CheckpointSource`` for inputs,
  ``OutputSink`` for outputs), ``TensorInfo``, ``FileFingerprint`` and ``StorageOptions``;
- ``local`` and ``s3/``: the two backends;
- ``checkpoint``: opening a reference, which files hold the weights, headers, config and
  fingerprints; ``tensors``: reading tensor data; ``writer``: the write guard and the
  streaming safetensors writer; ``convert``: pickle checkpoints, when allowed;
- ``safetensors_format``: the file format itself (headers, dtypes), no I/O.

Adding a backend: see CONTRIBUTING.md.
"""
