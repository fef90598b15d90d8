"""Small random Llama-shaped checkpoints for the demo, the benchmarks and the tests.

Experts are the base plus a small random task vector, as fine-tuning would leave them,
so sign elections and sparsification behave as on real merges. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 64
    layers: int = 4
    intermediate: int = 128
    vocab: int = 256
    heads: int = 4
    kv_heads: int = 2

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for i in range(self.layers):
            prefix = f"model.layers.{i}."
            shapes |= {
                prefix + "input_layernorm.weight": (self.hidden,),
                prefix + "self_attn.q_proj.weight": (self.hidden, self.hidden),
                prefix + "self_attn.k_proj.weight": (kv, self.hidden),
                prefix + "self_attn.v_proj.weight": (kv, self.hidden),
                prefix + "self_attn.o_proj.weight": (self.hidden, self.hidden),
                prefix + "post_attention_layernorm.weight": (self.hidden,),
                prefix + "mlp.gate_proj.weight": (self.intermediate, self.hidden),
                prefix + "mlp.up_proj.weight": (self.intermediate, self.hidden),
                prefix + "mlp.down_proj.weight": (self.hidden, self.intermediate),
            }
        shapes["model.norm.weight"] = (self.hidden,)
        shapes["lm_head.weight"] = (self.vocab, self.hidden)
        return shapes

    def config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


def random_weights(shape: LlamaShape, *, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, dims in shape.tensor_shapes().items():
        if name.endswith("norm.weight"):
            tensor = 1.0 + 0.05 * torch.randn(dims, generator=generator)
        else:
            tensor = torch.randn(dims, generator=generator) * (1.0 / dims[-1] ** 0.5)
        weights[name] = tensor.to(dtype)
    return weights


def fine_tuned(base: dict[str, torch.Tensor], *, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """The base plus a task vector of relative size ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for name, tensor in base.items():
        noise = torch.randn(tensor.shape, generator=generator) * tensor.float().std() * scale
        result[name] = (tensor.float() + noise).to(tensor.dtype)
    return result


def save_checkpoint(
    path: str | Path,
    weights: dict[str, torch.Tensor],
    shape: LlamaShape,
    *,
    max_file_bytes: int | None = None,
) -> Path:
    """Write a Hugging Face style checkpoint; split into several files above ``max_file_bytes``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(weights.values())).dtype
    (path / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    if max_file_bytes is None:
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        return path
    files: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if files[-1] and size + nbytes > max_file_bytes:
            files.append({})
            size = 0
        files[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, chunk in enumerate(files):
        file = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(chunk, path / file, metadata={"format": "pt"})
        weight_map |= {name: file for name in chunk}
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def save_word_tokenizer(path: str | Path, words: list[str]) -> Path:
    """A whitespace word-level tokenizer over ``words`` (after four special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(str(path))
    return Path(path)


def make_model_family(
    root: str | Path,
    *,
    experts: int,
    shape: LlamaShape = LlamaShape(),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_file_bytes: int | None = None,
) -> tuple[Path, list[Path]]:
    """A base and ``experts`` fine-tuned variants under ``root``; returns their paths."""
    root = Path(root)
    base = random_weights(shape, seed=seed, dtype=dtype)
    base_path = save_checkpoint(root / "base", base, shape, max_file_bytes=max_file_bytes)
    expert_paths = []
    for i in range(experts):
        weights = fine_tuned(base, seed=seed + 1000 + i)
        expert_paths.append(save_checkpoint(root / f"expert{i + 1}", weights, shape, max_file_bytes=max_file_bytes))
    return base_path, expert_paths
