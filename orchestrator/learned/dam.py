"""DAM, Differentiable Adaptive Merging: learn merging coefficients with every expert frozen.

Every tensor W of the merged model is Σᵢ cᵢ ⊙ Wᵢ with cᵢ broadcast along W's last
dimension: a linear layer's input columns (W = Σ Wᵢ·diag(cᵢ), ``lm_head`` included), an
embedding's dimensions, a norm's elements. The cᵢ start at 1/N (the plain average) and
learn, on each expert's own data, to make the merged model's next-token distribution
close to that expert's:

    loss = Σᵢ T²·KL(softmax(zᵢ/T) ‖ softmax(z_c/T))  +  λ_sim · Σ_tensors mean_{a<b} cos(c_a, c_b)
           (+ l1·Σ|c| + l2·Σc²)

The merged model is never materialised as a module: one skeleton (parameters on the meta
device, buffers real) runs ``torch.func.functional_call`` with the merged weights of the
step, computed from the frozen experts by ``ScaledSum`` (which saves nothing but the
experts it already holds). Memory is every expert once plus one merged forward and
backward; ``orchestrator.learned.memory`` says how much before anything is loaded.

Torch and transformers only: the MLflow record is ``orchestrator.learned.records``'s job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from orchestrator.errors import CheckpointError, TrainingError
from orchestrator.learned.data import Batch, make_batches, read_examples, tokenize
from orchestrator.learned.memory import MemoryEstimate, ModelShape, available_memory, check_memory, estimate_memory
from orchestrator.learned.settings import DamSettings
from orchestrator.storage import checkpoint as ckpt
from orchestrator.storage.base import StorageOptions, TensorInfo
from orchestrator.storage.tensors import read_tensor
from orchestrator.vocabulary import load_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------- the merged weights


class ScaledSum(torch.autograd.Function):
    """Σᵢ cᵢ ⊙ Wᵢ (cᵢ along the last dimension), summed in float32 in expert order, cast to
    the experts' dtype. Saves only the experts, which stay in memory anyway: no float32
    copies live past the tensor being merged."""

    @staticmethod
    def forward(ctx: Any, coefficients: torch.Tensor, *experts: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(*experts)
        out = experts[0].to(torch.float32) * coefficients[0]
        for i in range(1, len(experts)):
            out += experts[i].to(torch.float32) * coefficients[i]
        return out.to(experts[0].dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        experts = ctx.saved_tensors
        grad32 = grad.to(torch.float32)
        width = experts[0].shape[-1] if experts[0].dim() else 1
        rows = [(grad32 * e.to(torch.float32)).reshape(-1, width).sum(0) for e in experts]  # each (width,)
        return (torch.stack(rows), *([None] * len(experts)))


def merge_weights(experts: Sequence[Mapping[str, torch.Tensor]], coefficients: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The merged model's weights for ``names``: what training runs the model with."""
    return {name: ScaledSum.apply(coefficients[name], *(e[name] for e in experts)) for name in names}


def initial_coefficients(shapes: Mapping[str, Sequence[int]], experts: int) -> dict[str, torch.Tensor]:
    """1/N for every expert and every position along each tensor's last dimension."""
    return {name: torch.full((experts, int(shape[-1]) if shape else 1), 1.0 / experts) for name, shape in shapes.items()}


def similarity_penalty(coefficients: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Σ over tensors of the mean pairwise cosine similarity of the experts' coefficient rows."""
    total = torch.zeros(())
    for c in coefficients.values():  # (experts, width)
        n = c.shape[0]
        if n < 2:
            continue
        unit = F.normalize(c, dim=1)
        cosines = unit @ unit.T  # (experts, experts)
        pairs = torch.triu_indices(n, n, offset=1)
        total = total + cosines[pairs[0], pairs[1]].mean()
    return total


def distillation_loss(expert_logits: torch.Tensor, merged_logits: torch.Tensor, scored: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(z_e/T) ‖ softmax(z_c/T)), summed over the vocabulary and averaged over
    the scored positions. Logits: (batch, length, vocab); ``scored``: (batch, length - 1)."""
    teacher = F.log_softmax(expert_logits[:, :-1][scored].float() / temperature, dim=-1)  # (positions, vocab)
    student = F.log_softmax(merged_logits[:, :-1][scored].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum") / max(1, teacher.shape[0])
    return temperature**2 * kl


# ---------------------------------------------------------------- the experts


@dataclass
class Experts:
    refs: list[str]
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]  # every floating tensor of the checkpoints
    infos: list[dict[str, TensorInfo]]
    storage: StorageOptions | None

    def load(self, dtype: torch.dtype, device: str) -> list[dict[str, torch.Tensor]]:
        loaded = []
        for ref, infos in zip(self.refs, self.infos):
            source = ckpt.open_source(ref, storage=self.storage)
            loaded.append({name: read_tensor(source, infos[name]).to(device=device, dtype=dtype) for name in self.shapes})
        return loaded


FLOAT_CODES = {"F16", "BF16", "F32", "F64"}


def inspect_experts(refs: Sequence[str], *, storage: StorageOptions | None = None) -> Experts:
    """Headers and configs only: the experts share tensor names, shapes and architecture."""
    if not refs:
        raise TrainingError("DAM needs at least one expert in the recipe's models")
    infos, configs = [], []
    for ref in refs:
        source = ckpt.open_source(ref, storage=storage)
        infos.append(ckpt.read_tensor_index(source))
        configs.append(ckpt.read_config(source))
    reference = infos[0]
    for ref, index, config in zip(refs[1:], infos[1:], configs[1:]):
        if config.get("architectures") != configs[0].get("architectures"):
            raise CheckpointError(f"{ref} is a {config.get('architectures')}, {refs[0]} a {configs[0].get('architectures')}; DAM merges one architecture")
        for name, info in reference.items():
            other = index.get(name)
            if other is None:
                raise CheckpointError(f"tensor '{name}' of {refs[0]} is missing from {ref}")
            if tuple(other.shape) != tuple(info.shape):
                raise CheckpointError(f"tensor '{name}' has shape {list(other.shape)} in {ref} but {list(info.shape)} in {refs[0]}")
    shapes = {name: tuple(info.shape) for name, info in reference.items() if info.dtype in FLOAT_CODES}
    return Experts(refs=list(refs), config=configs[0], shapes=shapes, infos=infos, storage=storage)


def build_skeleton(config: Mapping[str, Any], dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    """The model with its parameters on the meta device (its buffers, e.g. rotary
    frequencies, real): ``functional_call`` supplies every weight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "architectures")}
    try:
        model_config = AutoConfig.for_model(config["model_type"], **settings)
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"cannot build the model of config.json (model_type {config.get('model_type')!r}): {error}") from None
    replaced: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                if id(parameter) not in replaced:  # tied weights stay tied
                    replaced[id(parameter)] = torch.nn.Parameter(parameter.to("meta"), requires_grad=False)
                module._parameters[name] = replaced[id(parameter)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return model.eval()


# ---------------------------------------------------------------- training


@dataclass
class StepLoss:
    step: int
    total: float
    kl: list[float]  # per expert
    regulariser: float  # λ_sim·similarity (+ L1, L2) after the step


@dataclass
class DamResult:
    experts: list[str]
    coefficients: dict[str, torch.Tensor]  # name -> (experts, shape[-1]) float32
    losses: list[StepLoss]
    steps: int
    seconds: float
    memory: MemoryEstimate
    names: list[str] = field(default_factory=list)  # the tensors the model runs with (the rest keep 1/N)

    def statistics(self, labels: Sequence[str] | None = None) -> dict[str, float]:
        """``<expert>/mean``, ``/std``, ``/min``, ``/max`` of each expert's coefficients over all
        tensors; experts by ``labels`` (default: their position)."""
        stats: dict[str, float] = {}
        for i in range(len(self.experts)):
            label = labels[i] if labels is not None else str(i)
            values = torch.cat([c[i].reshape(-1) for c in self.coefficients.values()])
            stats |= {f"{label}/mean": float(values.mean()), f"{label}/std": float(values.std()) if values.numel() > 1 else 0.0,
                      f"{label}/min": float(values.min()), f"{label}/max": float(values.max())}
        return stats


class DamTrainer:
    """Holds the frozen experts, the skeleton and the coefficients of one training."""

    def __init__(self, experts: Experts, settings: DamSettings, *, dtype: torch.dtype | None = None) -> None:
        self.settings = settings
        self.dtype = dtype or DTYPES[settings.dtype]
        self.device = settings.device
        self.refs = experts.refs
        self.model = build_skeleton(experts.config, self.dtype, self.device)
        self.names = [name for name, _ in self.model.named_parameters()]
        missing = [name for name in self.names if name not in experts.shapes]
        if missing:
            raise CheckpointError(f"{experts.refs[0]} has no tensor '{missing[0]}', which its config's model needs")
        self.weights = experts.load(self.dtype, self.device)
        used = set(self.names)  # a checkpoint tensor the model does not run with keeps 1/N
        self.coefficients = {name: c.to(self.device).requires_grad_(name in used)
                             for name, c in initial_coefficients(experts.shapes, len(experts.refs)).items()}

    def merged(self) -> dict[str, torch.Tensor]:
        return merge_weights(self.weights, self.coefficients, self.names)

    def logits(self, weights: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        from torch.func import functional_call

        kwargs = {"input_ids": batch.ids.to(self.device), "attention_mask": batch.attention.to(self.device)}
        return functional_call(self.model, dict(weights), args=(), kwargs=kwargs, tie_weights=True, strict=False).logits

    def expert_weights(self, index: int) -> dict[str, torch.Tensor]:
        return {name: self.weights[index][name] for name in self.names}

    def kl(self, index: int, batch: Batch, merged: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """T²·KL(expert ‖ merged) on one batch of that expert's data."""
        with torch.no_grad():
            teacher = self.logits(self.expert_weights(index), batch)
        student = self.logits(merged if merged is not None else self.merged(), batch)
        return distillation_loss(teacher, student, batch.scored.to(self.device), self.settings.temperature)

    def regulariser(self) -> torch.Tensor:
        trained = {name: self.coefficients[name] for name in self.names}
        total = self.settings.similarity_weight * similarity_penalty(trained)
        if self.settings.l1:
            total = total + self.settings.l1 * sum(c.abs().sum() for c in trained.values())
        if self.settings.l2:
            total = total + self.settings.l2 * sum((c * c).sum() for c in trained.values())
        return total

    def train(self, batches: Sequence[Sequence[Batch]], *, on_step: Callable[[StepLoss], None] | None = None) -> list[StepLoss]:
        """One pass (per epoch) over the longest dataset; a shorter one starts again."""
        trained = [self.coefficients[name] for name in self.names]
        optimizer = torch.optim.AdamW(trained, lr=self.settings.lr)
        steps = max(len(b) for b in batches) * self.settings.epochs
        losses = []
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            kls = []
            for index, expert_batches in enumerate(batches):
                loss = self.kl(index, expert_batches[step % len(expert_batches)])
                loss.backward()  # one merged forward and backward at a time
                kls.append(float(loss.detach()))
            regulariser = self.regulariser()
            if regulariser.requires_grad:
                regulariser.backward()
            optimizer.step()
            penalty = float(regulariser.detach())
            record = StepLoss(step=step, total=sum(kls) + penalty, kl=kls, regulariser=penalty)
            losses.append(record)
            if on_step is not None:
                on_step(record)
        return losses


def training_batches(experts: Experts, data: Sequence[str], settings: DamSettings) -> list[list[Batch]]:
    """Each expert's JSONL, tokenized with the first expert's tokenizer, in shuffled batches."""
    tokenizer = load_tokenizer(ckpt.open_source(experts.refs[0], storage=experts.storage))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for index, path in enumerate(data):
        examples = tokenize(read_examples(path), tokenizer, settings.max_length, source=path)
        batches.append(make_batches(examples, settings.batch_size, pad_id=pad, seed=settings.seed + index))
    return batches


def data_for(settings: DamSettings, experts: Sequence[str]) -> list[str]:
    """``fleet.dam.data`` in the experts' order; names the expert without data."""
    missing = [e for e in experts if e not in settings.data]
    if missing:
        raise TrainingError(f"fleet.dam.data has no JSONL for expert {missing[0]}; give one file per model: {{MODEL: data.jsonl}}")
    unknown = [key for key in settings.data if key not in experts]
    if unknown:
        raise TrainingError(f"fleet.dam.data names {unknown[0]}, which is not one of the recipe's models: {', '.join(experts)}")
    return [settings.data[e] for e in experts]


def train_dam(
    experts: Sequence[str],
    settings: DamSettings,
    *,
    storage: StorageOptions | None = None,
    on_step: Callable[[StepLoss], None] | None = None,
) -> DamResult:
    """Learn the coefficients of ``experts`` (local paths or s3:// URIs) on ``settings.data``.

    Checks the memory needed before any weight is read and fails with the size if it does
    not fit. Deterministic for ``settings.seed`` on one device and thread count.
    """
    started = time.perf_counter()
    data = data_for(settings, experts)
    found = inspect_experts(experts, storage=storage)
    limit = settings.memory_limit_bytes()
    estimate = estimate_memory(ModelShape.of(found.config, found.shapes), len(experts), settings,
                               available=limit if limit is not None else available_memory(settings.device))
    check_memory(estimate)
    batches = training_batches(found, data, settings)
    torch.manual_seed(settings.seed)
    trainer = DamTrainer(found, settings)
    losses = trainer.train(batches, on_step=on_step)
    coefficients = {name: c.detach().to("cpu", torch.float32) for name, c in trainer.coefficients.items()}
    return DamResult(
        experts=list(experts),
        coefficients=coefficients,
        losses=losses,
        steps=len(losses),
        seconds=time.perf_counter() - started,
        memory=estimate,
        names=list(trainer.names),
    )
