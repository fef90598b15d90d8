"""Tokenizers and vocabulary-indexed tensors when the models' vocabularies differ.

``tokenizer_source`` (or ``tokenizer.source``) picks the output's tokenizer: ``base`` (the
base's, or the first model's), a model reference (that model's), or ``union`` (the base's,
plus every token another model has and it lacks, appended in model order); the tokens
named under ``tokenizer.tokens`` are added when it lacks them. Embedding and head rows are
then permuted into the output vocabulary before merging. A model that lacks a token is
given a stand-in row, as mergekit does: the only owner's row when one model has it, else
the base's row when the base has it, else the mean of the owners' rows (zero if no model
has it), so the merge of that row reproduces the owner's embedding. A token configured
under ``tokenizer.tokens`` takes its stand-in from its ``source`` instead (every model's
row, with ``force``), and ``pad_to_multiple_of`` appends rows that are each model's mean row.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from orchestrator.errors import CheckpointError, RecipeError
from orchestrator.storage.base import CheckpointSource

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)

@dataclass(frozen=True)
class FixedRow:
    """A configured token's row: from ``input``'s row ``source_row`` (zeros when ``input`` is
    None), for the inputs that lack the token, or for all of them with ``force``."""

    row: int
    input: int | None
    source_row: int
    force: bool


VOCAB_TENSOR_HINTS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "output.weight")


def is_vocabulary_tensor(name: str, shape: Sequence[int], vocab_size: int | None) -> bool:
    """Embeddings and output heads: rows indexed by token id."""
    return bool(vocab_size) and len(shape) >= 1 and shape[0] == vocab_size and any(h in name for h in VOCAB_TENSOR_HINTS)


def load_tokenizer(source: CheckpointSource) -> Any:
    """The model's tokenizer, read through the storage layer into a scratch directory."""
    from transformers import AutoTokenizer

    files = [name for name in TOKENIZER_FILES if source.exists(name)]
    if not files:
        raise CheckpointError(f"{source.uri} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); "
                              "tokenizer_source needs every model's tokenizer")
    with tempfile.TemporaryDirectory(prefix="mergefleet-tokenizer-") as scratch:
        for name in files:
            (Path(scratch) / name).write_bytes(source.read_file(name))
        if source.exists("config.json"):
            (Path(scratch) / "config.json").write_bytes(source.read_file("config.json"))
        try:
            return AutoTokenizer.from_pretrained(scratch)
        except Exception as error:  # transformers raises many kinds here
            raise CheckpointError(f"the tokenizer of {source.uri} does not load: {error}") from None


def build_output_tokenizer(mode: str, tokenizers: dict[str, Any], base: str, add_tokens: Sequence[str] = ()) -> Any:
    """The output tokenizer: ``union`` extends the base's, otherwise the named model's is used;
    then each of ``add_tokens`` it lacks is appended."""
    import copy

    result = _union(tokenizers, base) if mode == "union" else tokenizers[mode]
    missing = [token for token in dict.fromkeys(add_tokens) if token not in result.get_vocab()]
    if missing:
        result = copy.deepcopy(result)
        for token in missing:
            result.add_tokens(token)
    return result


def _union(tokenizers: dict[str, Any], base: str) -> Any:
    import copy

    result = copy.deepcopy(tokenizers[base])
    known = set(result.get_vocab())
    for ref, tokenizer in tokenizers.items():
        if ref == base:
            continue
        special = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        missing = [token for token, _ in vocab if token not in known]
        if missing:
            result.add_tokens([t for t in missing if t not in special])
            extra_special = [t for t in missing if t in special]
            if extra_special:
                result.add_special_tokens({"additional_special_tokens": extra_special})
            known.update(missing)
    return result


def vocabulary_maps(output: Any, tokenizers: dict[str, Any], vocab_sizes: dict[str, int]) -> dict[str, list[int]]:
    """Per model: for each output token id, that model's row (-1 where it lacks the token)."""
    out_vocab = output.get_vocab()
    size = max(out_vocab.values()) + 1
    maps = {}
    for ref, tokenizer in tokenizers.items():
        theirs = tokenizer.get_vocab()
        rows = [-1] * size
        for token, out_id in out_vocab.items():
            row = theirs.get(token, -1)
            rows[out_id] = row if row < vocab_sizes[ref] else -1
        maps[ref] = rows
    return maps


def permute_rows(
    tensors: Sequence[torch.Tensor],
    maps: Sequence[torch.Tensor],
    base: int | None,
    *,
    fixed: Sequence[FixedRow] = (),
    size: int | None = None,
) -> list[torch.Tensor]:
    """Each input's rows in output-vocabulary order, stand-ins filled where a model lacks a token.

    ``maps[i][r]`` is input i's row for output row r, or -1. ``fixed`` are the configured
    tokens' rows (``input`` indexes ``tensors``); ``size`` (at least the maps' length) pads
    with each input's mean row. Pure: tensors in, tensors out.
    """
    present = torch.stack([m >= 0 for m in maps])  # (inputs, out_rows)
    count = present.sum(0)
    rows = maps[0].numel()
    gathered = []
    for tensor, row_map in zip(tensors, maps):
        out = tensor.new_zeros((rows, *tensor.shape[1:]))  # stored dtype: no float32 copy of a whole vocabulary
        have = row_map >= 0
        out[have] = tensor[row_map[have]]
        gathered.append(out)

    partial = ((count < len(tensors)) & (count > 0)).nonzero().flatten()
    if partial.numel():
        owners = present[:, partial].float()  # (inputs, partial rows)
        stacked = torch.stack([g[partial].float() for g in gathered])  # (inputs, partial rows, ...)
        weights = owners.view(*owners.shape, *([1] * (stacked.dim() - 2)))
        stand_in = (stacked * weights).sum(0) / owners.sum(0).view(-1, *([1] * (stacked.dim() - 2)))
        if base is not None:
            use_base = present[base, partial] & (count[partial] > 1)
            stand_in[use_base] = stacked[base][use_base]
        for out, have in zip(gathered, present):
            lacking = ~have[partial]
            out[partial[lacking]] = stand_in[lacking].to(out.dtype)
    for row in fixed:
        value = None if row.input is None else tensors[row.input][row.source_row]
        for out, have in zip(gathered, present):
            if row.force or not have[row.row]:
                out[row.row] = 0 if value is None else value.to(out.dtype)
    if size is not None and size > rows:
        gathered = [torch.cat([out, out.mean(0, keepdim=True).expand(size - rows, *out.shape[1:])]) for out in gathered]
    return gathered


def check_tokenizer_source(value: str | None, refs: Sequence[str], *, key: str = "tokenizer_source") -> None:
    if value in (None, "base", "union") or value in refs:
        return
    raise RecipeError(f"{key} '{value}' is neither 'base', 'union' nor one of the recipe's models ({', '.join(refs)})")
