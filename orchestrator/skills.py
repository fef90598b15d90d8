"""Experts that really have skills: a tiny Llama base and experts fine-tuned from it.

Random experts make evaluation meaningless, so the demo and the tests use these instead.
On CPU, in well under a minute:

1. a character-level tokenizer (built here, nothing downloaded);
2. a tiny ``LlamaForCausalLM`` *base*, trained on generic synthetic text: random words and
   numbers, and lines in every skill's format with random answers (so the base knows the
   formats but none of the skills, as a pretrained model knows a prompt format before
   instruction tuning);
3. one *expert* per skill, fine-tuned from the base (same start, so task vectors make sense)
   on that skill, with a quarter of the batches replaying the base's data (without its
   own skill's random answers);
4. an lm-eval multiple-choice task per skill (``skill_<name>.yaml`` + ``.jsonl``), chance 25 %.

Skills (``SKILLS``): ``add`` (two digits, ``add: 3+4 =`` → ``07``), ``map`` (a made-up
vocabulary to another, ``map: bal =`` → ``zix``), ``next`` (the three letters after one,
``next: k =`` → ``lmn``), ``prev`` (the three letters before one, ``prev: k =`` → ``jih``;
used by the Merge to Mix benchmark). All are facts a tiny model can store in a few hundred
steps; algorithmic skills (reversing a word, copying the k-th letter) need far longer.

Everything is deterministic for a seed (one CPU thread while training), and the result is
cached under the output directory: a second call with the same settings returns at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

SKILLS_VERSION = 1
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARACTERS = string.ascii_lowercase + string.digits + " :=+-.,|>\n"
LETTERS = string.ascii_lowercase
PAD, BOS, EOS = 0, 1, 2
MAX_LENGTH = 64
STAMP = "skills.json"

Example = tuple[str, str, list[str]]  # prompt, answer, choices (the answer among them)


# ---------------------------------------------------------------- the skills


def _distinct(rng: random.Random, answer: str, draw: Callable[[], str], count: int = 4) -> list[str]:
    choices = {answer}
    while len(choices) < count:
        choices.add(draw())
    return sorted(choices)


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    answer = f"{a + b:02d}"
    return f"add: {a}+{b} =", answer, _distinct(rng, answer, lambda: f"{rng.randint(0, 18):02d}")


def _vocabularies(seed: int = 99) -> dict[str, str]:
    """24 made-up words and the made-up words they translate to."""
    rng = random.Random(seed)
    source: set[str] = set()
    while len(source) < 24:
        source.add(rng.choice("bdgkmpt") + rng.choice("aeiou") + rng.choice("lnrs"))
    target: set[str] = set()
    while len(target) < 24:
        target.add(rng.choice("fhjqvwxyz") + rng.choice("aeiou") + rng.choice("cfhx"))
    words, translations = sorted(source), sorted(target)
    rng.shuffle(translations)
    return dict(zip(words, translations))


VOCABULARY = _vocabularies()


def _map(rng: random.Random) -> Example:
    word = rng.choice(sorted(VOCABULARY))
    answer = VOCABULARY[word]
    return f"map: {word} =", answer, _distinct(rng, answer, lambda: rng.choice(sorted(VOCABULARY.values())))


def _next(rng: random.Random) -> Example:
    i = rng.randrange(len(LETTERS) - 3)
    answer = LETTERS[i + 1 : i + 4]

    def other() -> str:
        j = rng.randrange(len(LETTERS) - 3)
        return LETTERS[j + 1 : j + 4]

    return f"next: {LETTERS[i]} =", answer, _distinct(rng, answer, other)


def _prev(rng: random.Random) -> Example:
    i = rng.randrange(3, len(LETTERS))
    answer = LETTERS[i - 3 : i][::-1]

    def other() -> str:
        j = rng.randrange(3, len(LETTERS))
        return LETTERS[j - 3 : j][::-1]

    return f"prev: {LETTERS[i]} =", answer, _distinct(rng, answer, other)


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    example: Callable[[random.Random], Example] = field(repr=False)


SKILLS: dict[str, Skill] = {
    skill.name: skill
    for skill in (
        Skill("add", "the sum of two digits, as two digits", _add),
        Skill("map", "translate a made-up word into another made-up vocabulary", _map),
        Skill("next", "the three letters after a letter", _next),
        Skill("prev", "the three letters before a letter, nearest first", _prev),
    )
}


def _generic(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(3, 7)):
        kind = rng.random()
        if kind < 0.6:
            parts.append("".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6))))
        elif kind < 0.85:
            parts.append(str(rng.randint(0, 99)))
        else:
            parts.append(rng.choice(":=+-.,|>"))
    return " ".join(parts)


def task_name(skill: str) -> str:
    return f"skill_{skill}"


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SkillsConfig:
    """A base and one expert per skill; the defaults take well under a minute on 2 cores."""

    skills: tuple[str, ...] = ("add", "map")
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 192
    base_steps: int = 400
    expert_steps: int = 250
    batch_size: int = 64
    base_lr: float = 3e-3
    expert_lr: float = 1e-3
    replay: float = 0.25  # share of an expert's batch that replays the base's data
    eval_examples: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.skills if s not in SKILLS]
        if unknown:
            raise ValueError(f"unknown skill(s) {', '.join(unknown)}; available: {', '.join(sorted(SKILLS))}")
        if not 1 <= len(self.skills) <= len(SKILLS) or len(set(self.skills)) != len(self.skills):
            raise ValueError(f"give 1 to {len(SKILLS)} distinct skills, got {list(self.skills)}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must be a multiple of heads, and heads a multiple of kv_heads")
        if not 0.0 <= self.replay < 1.0:
            raise ValueError(f"replay is a share of the batch, 0 <= replay < 1; got {self.replay}")

    def digest(self) -> str:
        identity = {"version": SKILLS_VERSION, **asdict(self)}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SkillModels:
    """Where the base, the experts and the tasks are."""

    root: Path
    base: Path
    experts: dict[str, Path]  # skill -> checkpoint
    tasks_dir: Path  # every task YAML and its JSONL
    tasks: dict[str, str]  # skill -> lm-eval task name
    seconds: float
    cached: bool = False

    @property
    def owners(self) -> dict[str, str]:
        """task -> expert checkpoint, for ``fleet.eval.owners``."""
        return {self.tasks[skill]: str(path) for skill, path in self.experts.items()}

    def recipe(self, method: str = "ties", *, output: str | Path, parameters: dict[str, Any] | None = None, **fleet: Any) -> dict[str, Any]:
        """A recipe that merges every expert onto the base and evaluates base, experts and merge."""
        per_model = parameters or ({"weight": 1.0, "density": 0.6} if method in ("ties", "dare_ties") else {"weight": 1.0})
        recipe: dict[str, Any] = {
            "merge_method": method,
            "base_model": str(self.base),
            "models": [{"model": str(path), "parameters": dict(per_model)} for path in self.experts.values()],
            "dtype": "float32",
            "fleet": {
                "output": str(output),
                "eval": {"tasks": [str(self.tasks_dir)], "evaluate_inputs": True, "owners": self.owners},
            },
        }
        recipe["fleet"].update(fleet)
        return recipe


# ---------------------------------------------------------------- tokenizer and model


def build_tokenizer() -> Any:
    """A character-level tokenizer: one token per character, no special tokens added."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_LENGTH,
    )


_VOCAB = {c: i for i, c in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}


def encode(text: str) -> list[int]:
    return [_VOCAB[c] for c in text]


def _model_config(config: SkillsConfig) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(_VOCAB),
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=MAX_LENGTH,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


# ---------------------------------------------------------------- training


def _language(rng: random.Random) -> str:
    """A sentence of a made-up language: words of two to three syllables from its own inventory."""
    words = ["".join(rng.choice(LANGUAGE_SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(rng.randint(3, 6))]
    return " ".join(words) + rng.choice(".,")


LANGUAGE_SYLLABLES = ("ka", "lo", "mi", "nu", "te", "ri", "so", "va", "zu", "pe", "qi", "wo")


def _sample(source: str, rng: random.Random) -> tuple[str, str | None]:
    """(text, None) trains on every token; (prompt, answer) only on the answer. Sources:
    ``generic``, ``language`` (a made-up language's text), ``skill:NAME`` and ``noise:NAME``."""
    if source == "generic":
        return _generic(rng) + "\n", None
    if source == "language":
        return _language(rng) + "\n", None
    kind, _, name = source.partition(":")
    prompt, answer, choices = SKILLS[name].example(rng)
    if kind == "noise":  # the format with a random answer
        return f"{prompt} {rng.choice(choices)}\n", None
    return prompt, f" {answer}\n"


def _batch(sources: list[str], weights: list[float], rng: random.Random, size: int, length: int = 32) -> tuple[Any, Any]:
    import torch

    ids = torch.full((size, length), PAD, dtype=torch.long)
    labels = torch.full((size, length), -100, dtype=torch.long)
    for row in range(size):
        text, answer = _sample(rng.choices(sources, weights)[0], rng)
        prompt = encode(text)[:length]
        tokens = prompt + (encode(answer) if answer else [])
        tokens = tokens[:length]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        first = len(prompt) if answer else 0
        labels[row, first : len(tokens)] = torch.tensor(tokens[first:])
    return ids, labels


def _train(model: Any, sources: list[str], weights: list[float], *, steps: int, lr: float, batch: int, seed: int) -> float:
    import torch
    import torch.nn.functional as F

    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        scale = min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        ids, labels = _batch(sources, weights, rng, batch)
        logits = model(input_ids=ids).logits[:, :-1]  # (batch, length - 1, vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
    model.eval()
    return loss_value


def _save(model: Any, tokenizer: Any, path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_task(directory: Path, skill: str, *, examples: int, seed: int) -> Path:
    """``skill_<name>.jsonl`` (prompt, choices, answer) and the lm-eval YAML that reads it."""
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    data = directory / f"{task_name(skill)}.jsonl"
    with open(data, "w") as handle:
        for _ in range(examples):
            prompt, answer, choices = SKILLS[skill].example(rng)
            handle.write(json.dumps({"prompt": prompt, "choices": choices, "answer": choices.index(answer)}) + "\n")
    config = {
        "task": task_name(skill),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}, "cache_dir": str((directory / ".datasets-cache").resolve())},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "description": SKILLS[skill].description},
    }
    path = directory / f"{task_name(skill)}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _cached(root: Path, config: SkillsConfig) -> SkillModels | None:
    stamp = root / STAMP
    if not stamp.is_file():
        return None
    try:
        data = json.loads(stamp.read_text())
    except ValueError:
        return None
    if data.get("digest") != config.digest():
        return None
    models = SkillModels(
        root=root,
        base=Path(data["base"]),
        experts={k: Path(v) for k, v in data["experts"].items()},
        tasks_dir=Path(data["tasks_dir"]),
        tasks=dict(data["tasks"]),
        seconds=float(data["seconds"]),
        cached=True,
    )
    paths = [models.base, *models.experts.values()]
    if not all((p / "model.safetensors").is_file() for p in paths) or not models.tasks_dir.is_dir():
        return None
    return models


def build_skills(
    root: str | Path,
    config: SkillsConfig = SkillsConfig(),
    *,
    force: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> SkillModels:
    """Train (or reuse) the base and one expert per skill under ``root``; write the tasks.

    Layout: ``root/base``, ``root/experts/<skill>``, ``root/tasks/skill_<skill>.{yaml,jsonl}``.
    ``on_step`` hears a line per finished model.
    """
    import torch
    from transformers import LlamaForCausalLM

    root = Path(root).resolve()
    if not force:
        found = _cached(root, config)
        if found is not None:
            return found
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / STAMP).unlink(missing_ok=True)
    say = on_step or (lambda line: log.info("%s", line))
    tokenizer = build_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same numbers on every machine; tiny matmuls gain little from threads
    try:
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(_model_config(config))
        base_sources = ["generic"] + [f"noise:{s}" for s in config.skills]
        base_weights = [0.5] + [0.5 / len(config.skills)] * len(config.skills)
        loss = _train(model, base_sources, base_weights, steps=config.base_steps, lr=config.base_lr, batch=config.batch_size, seed=config.seed + 1)
        base = _save(model, tokenizer, root / "base")
        say(f"base: {config.base_steps} steps on generic text, loss {loss:.2f} ({time.perf_counter() - started:.1f} s)")
        base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}

        experts: dict[str, Path] = {}
        for index, skill in enumerate(config.skills):
            model.load_state_dict(base_state)
            replay = ["generic"] + [f"noise:{s}" for s in config.skills if s != skill]
            sources = [f"skill:{skill}"] + replay
            weights = [1.0 - config.replay] + [config.replay / len(replay)] * len(replay)
            loss = _train(model, sources, weights, steps=config.expert_steps, lr=config.expert_lr, batch=config.batch_size, seed=config.seed + 100 + index)
            experts[skill] = _save(model, tokenizer, root / "experts" / skill)
            say(f"expert '{skill}': {config.expert_steps} steps fine-tuning from the base, loss {loss:.2f} ({time.perf_counter() - started:.1f} s)")
    finally:
        torch.set_num_threads(threads)

    tasks_dir = root / "tasks"
    if tasks_dir.exists():
        shutil.rmtree(tasks_dir)
    for index, skill in enumerate(config.skills):
        write_task(tasks_dir, skill, examples=config.eval_examples, seed=config.seed + 10_000 + index)
    models = SkillModels(
        root=root,
        base=base,
        experts=experts,
        tasks_dir=tasks_dir,
        tasks={skill: task_name(skill) for skill in config.skills},
        seconds=round(time.perf_counter() - started, 2),
    )
    stamp = {
        "digest": config.digest(),
        "config": asdict(config),
        "base": str(models.base),
        "experts": {k: str(v) for k, v in models.experts.items()},
        "tasks_dir": str(models.tasks_dir),
        "tasks": models.tasks,
        "seconds": models.seconds,
    }
    (root / STAMP).write_text(json.dumps(stamp, indent=1))
    return models
