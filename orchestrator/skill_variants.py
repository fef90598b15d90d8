"""More models from the skill base, for the checks of the trained merges (DAM, Merge to Mix, ties_sv).

Built on ``orchestrator.skills`` (its base, skills, tokenizer and training loop), without
changing anything that module trains, so the demo's models and scores stay as they are:

- ``fine_tune``: the base fine-tuned on the union of some skills' data (Merge to Mix's
  "real" fine-tuning of a mixture, and its per-dataset candidates);
- ``drift``: the base trained for long on a made-up language (a continually pre-trained
  language model whose task vector is large, for ties_sv);
- ``write_skill_data``: a skill's training examples as DAM's JSONL (prompt, completion).

Every model is cached under its output directory by a digest of what made it.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from orchestrator import skills

STAMP = "variant.json"


@dataclass(frozen=True)
class FineTune:
    """``sources`` (skills' ``_sample`` names) with their shares of each batch."""

    sources: tuple[str, ...]
    weights: tuple[float, ...]
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0

    def digest(self, base: Path) -> str:
        weights = (Path(base) / "model.safetensors").stat()
        identity = {"version": 1, "base": str(base), "base_size": weights.st_size, "base_mtime": weights.st_mtime_ns, **asdict(self)}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def skill_mixture(names: Sequence[str], *, replay: float = 0.25, **settings: float | int) -> FineTune:
    """Equal shares of each skill's data, ``replay`` of the batch generic text."""
    sources = tuple(f"skill:{name}" for name in names) + ("generic",)
    share = (1.0 - replay) / len(names)
    return FineTune(sources=sources, weights=tuple([share] * len(names) + [replay]), **settings)  # type: ignore[arg-type]


def train_variant(base: Path, recipe: FineTune, output: Path) -> Path:
    """The base trained by ``recipe`` into ``output`` (reused when already there)."""
    import torch
    from transformers import LlamaForCausalLM

    output = Path(output)
    digest = recipe.digest(base)
    stamp = output / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("digest") == digest and (output / "model.safetensors").is_file():
        return output
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as skills.build_skills: the same numbers on every machine
    try:
        started = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        loss = skills._train(model, list(recipe.sources), list(recipe.weights), steps=recipe.steps, lr=recipe.lr,
                             batch=recipe.batch_size, seed=recipe.seed)
        skills._save(model, skills.build_tokenizer(), output)
    finally:
        torch.set_num_threads(threads)
    stamp.write_text(json.dumps({"digest": digest, "recipe": asdict(recipe), "loss": loss, "seconds": time.perf_counter() - started}))
    return output


def fine_tune(base: Path, names: Sequence[str], output: Path, **settings: float | int) -> Path:
    """The base fine-tuned on the union of the skills ``names`` (equal shares)."""
    return train_variant(base, skill_mixture(names, **settings), output)


def drift(base: Path, output: Path, *, formats: Sequence[str] = (), steps: int = 300, lr: float = 3e-3, replay: float = 0.3, seed: int = 0) -> Path:
    """The base trained for long on a made-up language (a continually pre-trained language
    model: a task vector much larger than a skill's); ``replay`` of each batch is the base's
    own data, generic text and the ``formats`` of skills with random answers."""
    others = ("generic",) + tuple(f"noise:{name}" for name in formats)
    weights = (1.0 - replay,) + tuple([replay / len(others)] * len(others))
    return train_variant(base, FineTune(sources=("language",) + others, weights=weights, steps=steps, lr=lr, batch_size=32, seed=seed), output)


def write_skill_data(path: Path, skill: str, *, examples: int, seed: int) -> Path:
    """``examples`` lines of {"prompt", "completion"} of ``skill`` (DAM's training data)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for _ in range(examples):
            prompt, answer, _ = skills.SKILLS[skill].example(rng)
            handle.write(json.dumps({"prompt": prompt, "completion": f" {answer}\n"}) + "\n")
    return path
