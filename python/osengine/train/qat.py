"""Quantization-aware training of the linears' inputs with a kurtosis penalty on their outputs (Nrusimha et al.
2024, "Mitigating the Impact of Outlier Channels for Language Model Quantization with Activation Regularization").

Every block linear that the recipe quantizes reads its input through a fake quantizer whose rounding passes the
gradient straight through (STE):
- static per-tensor specs learn their clipping range (lo, hi): the step (hi - lo) / qmax and the zero point follow
  from it exactly as the engine's static quantizer computes them (quant.spec.qparams_from_range), so the gradient
  reaches lo and hi through the clamp (values beyond the range: PACT) and through the step (values inside: LSQ);
  ranges start at the `init_quantile` and 1 - `init_quantile` quantiles of the input's values on the first batch;
- dynamic specs (per-token, per-group) quantize as the engine does, with nothing to learn.
The loss is cross-entropy + kurtosis_weight * sum over the quantized linears and their output tokens of the token's
kurtosis over channels, kappa_t = mean_j ((o_tj - mu_t) / (sigma_t + eps))^4 (the paper's term; it keeps the
weights from growing outlier channels while the model adapts). Weights stay in floating point during training; they
are quantized afterwards by the post-training pipeline (round to nearest or GPTQ), which also takes the learned
ranges as the static activation ranges (osengine.api.train_qat).

Training state (weights, ranges, optimizer moments, step, history) is saved every `save_every` steps into a fresh
folder renamed into place (a crash leaves the previous state intact), as safetensors plus JSON: nothing is
unpickled on resume. Batches are a function of (seed, step), so a resumed run sees the same data as an
uninterrupted one and ends with the same weights.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..quant.hadamard import hadamard_transform
from ..quant.layers import FakeQuantLinear
from ..quant.recipes import Recipe
from ..quant.spec import QuantSpec, quantize_dynamic

STATE_PREFIX = "step-"
KURTOSIS_EPS = 1e-6


class QATError(ValueError):
    """Bad QAT settings, data, or a training state that does not belong to this run."""


@dataclass(frozen=True)
class QATConfig:
    steps: int = 300
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 1e-4               # model weights: AdamW, cosine decay after warmup
    range_lr: float = 1e-3         # clipping ranges: Adam without momentum (beta1 = 0), no weight decay
    weight_decay: float = 0.0
    warmup_steps: int = 10
    kurtosis_weight: float = 1e-7   # docs/quantization.md: the sum over tokens and linears is ~3e6 on SmolLM2
    init_quantile: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 25

    def check(self) -> None:
        ints = {"steps": 1, "batch_size": 1, "seq_len": 2, "warmup_steps": 0, "save_every": 1, "seed": 0}
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise QATError(f"QAT setting '{name}' must be an integer >= {low}, got {v!r}")
        for name in ("lr", "range_lr", "weight_decay", "kurtosis_weight", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise QATError(f"QAT setting '{name}' must be a finite number >= 0, got {v!r}")
        if not 0.5 < self.init_quantile <= 1.0:
            raise QATError(f"QAT setting 'init_quantile' must be in (0.5, 1], got {self.init_quantile!r}")


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def static_fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The engine's static per-tensor quantizer for the range (lo, hi) (quant.spec.qparams_from_range, then
    fake_quant), differentiable in x, lo and hi through straight-through rounding."""
    if spec.symmetric:
        delta = (torch.maximum(lo.abs(), hi.abs()) / spec.qmax).clamp(min=1e-8)
        zero_point = torch.zeros_like(delta)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        delta = ((hi - lo) / spec.qmax).clamp(min=1e-8)
        zero_point = ste_round(-lo / delta).clamp(spec.qmin, spec.qmax)
    codes = torch.clamp(ste_round(x / delta) + zero_point, spec.qmin, spec.qmax)
    return (codes - zero_point) * delta


def token_kurtosis_sum(out: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the kurtosis of each token's output over channels (population moments)."""
    o = out.float().reshape(-1, out.shape[-1])
    mu = o.mean(dim=-1, keepdim=True)
    sigma = (o - mu).pow(2).mean(dim=-1, keepdim=True).sqrt()
    return ((o - mu) / (sigma + KURTOSIS_EPS)).pow(4).mean(dim=-1).sum()


class QATLinear(nn.Module):
    """A linear whose input is fake-quantized for training; keeps the kurtosis of its last output. A linear that
    rotates its input online (a FakeQuantLinear of a rotated model: strategy rotate) rotates before quantizing, as the
    engine does."""

    def __init__(self, linear: nn.Module, spec: QuantSpec):
        super().__init__()
        self.linear, self.spec = linear, spec
        self.rotates = getattr(linear, "input_rotation", None) is not None
        self.learns_range = not spec.dynamic
        if self.learns_range and spec.granularity != "per-tensor":
            raise QATError(f"QAT: static activations must be per-tensor, got {spec.granularity}")
        self.lo = nn.Parameter(torch.tensor(float("nan"))) if self.learns_range else None
        self.hi = nn.Parameter(torch.tensor(float("nan"))) if self.learns_range else None
        self.initialising = False
        self.seen: list = []
        self.kurtosis: Optional[torch.Tensor] = None

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.learns_range:
            return x + (quantize_dynamic(x.detach(), self.spec) - x).detach()
        return static_fake_quant(x, self.lo.to(x.dtype), self.hi.to(x.dtype), self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotates:
            x = hadamard_transform(x).to(x.dtype)
        if self.initialising:
            self.seen.append(x.detach().float().flatten())
        else:
            x = self.quantize_input(x)
        out = nn.functional.linear(x, self.linear.weight, self.linear.bias)
        self.kurtosis = token_kurtosis_sum(out)
        return out


def install_qat(model: nn.Module, blocks: list, recipe: Recipe) -> dict:
    """Wrap every linear of `blocks` (full names) that the recipe quantizes in a QATLinear; {full name: QATLinear}."""
    wrapped = {}
    for block_name in blocks:
        block = model.get_submodule(block_name)
        for name, m in list(block.named_modules()):
            full = f"{block_name}.{name}"
            if getattr(m, "input_shift", None) is not None:
                raise QATError(f"QAT: {full} already has a runtime shift (a migrated model); train the "
                               "floating-point model")
            if isinstance(m, (nn.Linear, FakeQuantLinear)) and not recipe.keeps_fp(full):
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                q = QATLinear(m, recipe.activation_spec(full)).to(m.weight.device)
                setattr(parent, child, q)
                wrapped[full] = q
    if not wrapped:
        raise QATError("QAT: the recipe keeps every block linear in floating point; nothing to train")
    return wrapped


def remove_qat(model: nn.Module, wrapped: dict) -> dict:
    """Put the plain linears back; returns the learned static ranges {full name: (lo, hi)}."""
    ranges = {}
    for full, q in wrapped.items():
        parent_name, _, child = full.rpartition(".")
        setattr(model.get_submodule(parent_name), child, q.linear)
        if q.learns_range:
            ranges[full] = (float(q.lo.detach()), float(q.hi.detach()))
    return ranges


@torch.no_grad()
def initialise_ranges(model: nn.Module, wrapped: dict, batch: torch.Tensor, quantile: float) -> None:
    """Static ranges from the quantiles of each input's values on one floating-point pass over `batch`."""
    static = [q for q in wrapped.values() if q.learns_range]
    if not static:
        return
    for q in static:
        q.initialising, q.seen = True, []
    try:
        model(input_ids=batch)
    finally:
        for q in static:
            q.initialising = False
    for q in static:
        values = torch.cat(q.seen)
        q.seen = []
        if values.numel() > 2 ** 24:   # torch.quantile's limit: an evenly spaced subsample
            values = values[:: math.ceil(values.numel() / 2 ** 24)]
        lo = float(torch.quantile(values, 1.0 - quantile)) if quantile < 1 else float(values.min())
        hi = float(torch.quantile(values, quantile)) if quantile < 1 else float(values.max())
        q.lo.fill_(min(lo, 0.0))
        q.hi.fill_(max(hi, lo + 1e-6, 0.0))


def batch_for_step(windows: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The training batch of `step`: epochs of a seeded permutation of the windows (a function of step alone)."""
    n = windows.shape[0]
    per_epoch = max(1, n // batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    chosen = order[index * batch_size:(index + 1) * batch_size]
    if chosen.numel() < batch_size:    # fewer windows than a batch: repeat them
        chosen = order.repeat(math.ceil(batch_size / n))[:batch_size]
    return windows[chosen]


def learning_rate(config: QATConfig, step: int, base: float) -> float:
    """Linear warmup, then cosine decay to zero at the last step."""
    if step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    return base * 0.5 * (1 + math.cos(math.pi * (step - config.warmup_steps) / span))


def _optimizer(model: nn.Module, wrapped: dict, config: QATConfig) -> torch.optim.Optimizer:
    ranges = [p for q in wrapped.values() if q.learns_range for p in (q.lo, q.hi)]
    ids = {id(p) for p in ranges}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": weights, "lr": config.lr, "weight_decay": config.weight_decay, "name": "weights"}]
    if ranges:
        groups.append({"params": ranges, "lr": config.range_lr, "weight_decay": 0.0, "betas": (0.0, 0.999),
                       "name": "ranges"})
    return torch.optim.AdamW(groups)


# ----------------------------------------------------------------------------------------------------------------
# Training state on disk
# ----------------------------------------------------------------------------------------------------------------


def _state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    named = dict(model.named_parameters())
    names = {id(p): n for n, p in named.items()}
    tensors = {f"model.{n}": p.detach().cpu().contiguous().clone() for n, p in named.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors[f"optim.{key}.{names[id(p)]}"] = state[key].cpu().contiguous().clone()
            if "step" in state:
                tensors[f"optim.step.{names[id(p)]}"] = torch.as_tensor(state["step"], dtype=torch.float32).cpu(
                ).reshape(1)
    return tensors


def save_state(directory: Path, step: int, model: nn.Module, optimizer, meta: dict) -> Path:
    """Write the state after `step` steps as directory/step-N (written aside, then renamed); older states go."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{STATE_PREFIX}{step:08d}"
    partial = directory / f".partial-{step:08d}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file(_state_tensors(model, optimizer), str(partial / "state.safetensors"))
    (partial / "state.json").write_text(json.dumps({**meta, "step": step}, indent=1))
    for f in partial.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(partial, final)
    for old in directory.glob(f"{STATE_PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(".partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_state(directory: Path) -> Optional[Path]:
    states = sorted(p for p in directory.glob(f"{STATE_PREFIX}*") if (p / "state.json").is_file())
    return states[-1] if states else None


def load_state(path: Path, model: nn.Module, optimizer, expected: dict) -> dict:
    """Restore weights, ranges and optimizer moments from `path`; QATError when it belongs to another run."""
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except Exception as e:   # a damaged state is reported, never half-loaded
        raise QATError(f"QAT state {path} cannot be read ({e}); delete it to start again") from e
    for key, want in expected.items():
        if meta.get(key) != want:
            raise QATError(f"QAT state {path} was started with {key}={meta.get(key)!r}, this run has {want!r}; "
                           "rerun with the same settings, or delete the state to start again")
    named = dict(model.named_parameters())
    missing = [n for n in named if f"model.{n}" not in tensors]
    if missing:
        raise QATError(f"QAT state {path} lacks parameters ({missing[:3]}...); delete it to start again")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(tensors[f"model.{n}"])
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = next(n for n, q in named.items() if q is p)
            if f"optim.exp_avg.{name}" in tensors:
                optimizer.state[p] = {"step": tensors[f"optim.step.{name}"].reshape(()).clone(),
                                      "exp_avg": tensors[f"optim.exp_avg.{name}"].to(p.device),
                                      "exp_avg_sq": tensors[f"optim.exp_avg_sq.{name}"].to(p.device)}
    return meta


# ----------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------


def train(model: nn.Module, blocks: list, recipe: Recipe, windows: torch.Tensor, config: QATConfig,
          state_dir: Path, run_id: dict, resume: bool = False, progress: bool = True,
          stop_after: Optional[int] = None, on_step: Optional[Callable[[int, dict], None]] = None) -> tuple:
    """QAT of `model` (in place) on token windows [n, seq_len]; returns (learned static ranges {linear full name:
    (lo, hi)}, history [{step, loss, cross_entropy, kurtosis, lr, seconds}]) with the QAT wrappers removed.

    state_dir  where the training state is saved every config.save_every steps; an existing state is an error
               unless `resume` (then training continues from it; it must come from the same `run_id`: model, recipe,
               data and settings)
    stop_after stop (saving the state) after this many steps in total, as an interrupted run would"""
    config.check()
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise QATError(f"QAT: training data must be token windows [n, seq_len], got shape {tuple(windows.shape)}")
    state_dir = Path(state_dir)
    existing = latest_state(state_dir) if state_dir.is_dir() else None
    if existing is not None and not resume:
        raise QATError(f"a QAT state from an earlier run is at {existing}: pass resume (--resume) to continue it, "
                       "or delete that folder to start again")
    # the weights' spec does not enter training (weights stay in floating point): a finished state can be
    # quantized again with another weight rounding
    trained_recipe = {k: v for k, v in recipe.to_dict().items() if k not in ("name", "weights")}
    run_id = {**run_id, "config": asdict(config), "recipe": trained_recipe}
    model.train()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    wrapped = install_qat(model, blocks, recipe)
    device = next(model.parameters()).device
    optimizer = _optimizer(model, wrapped, config)
    history: list = []
    start = 0
    if existing is not None:
        meta = load_state(existing, model, optimizer, {"run": run_id})
        start, history = int(meta["step"]), list(meta["history"])
    else:
        initialise_ranges(model, wrapped, batch_for_step(windows, 0, config.batch_size, config.seed).to(device),
                          config.init_quantile)
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=config.steps, desc=f"QAT ({recipe.name})",
               disable=not progress)
    try:
        for step in bar:
            t0 = time.time()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step, config.lr if group["name"] == "weights" else config.range_lr)
            ids = batch_for_step(windows, step, config.batch_size, config.seed).to(device)
            out = model(input_ids=ids, labels=ids)
            kurtosis = torch.stack([q.kurtosis for q in wrapped.values()]).sum()
            loss = out.loss + config.kurtosis_weight * kurtosis
            if not torch.isfinite(loss):
                raise QATError(f"QAT: the loss is not finite at step {step} (cross-entropy {float(out.loss)}, "
                               f"kurtosis {float(kurtosis)}); lower lr or kurtosis_weight")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            record = {"step": step + 1, "loss": loss.item(), "cross_entropy": out.loss.item(),
                      "kurtosis": kurtosis.item(), "lr": optimizer.param_groups[0]["lr"],
                      "seconds": round(time.time() - t0, 3)}
            history.append(record)
            bar.set_postfix(ce=f"{record['cross_entropy']:.3f}", kurt=f"{record['kurtosis']:.3g}")
            if on_step is not None:
                on_step(step + 1, record)
            if (step + 1) % config.save_every == 0 or step + 1 == end:
                save_state(state_dir, step + 1, model, optimizer, {"run": run_id, "history": history})
    finally:
        bar.close()
        for q in wrapped.values():
            q.kurtosis = None
    model.eval()
    ranges = remove_qat(model, wrapped)
    return ranges, history


__all__ = ["QATConfig", "QATError", "QATLinear", "batch_for_step", "install_qat", "latest_state", "remove_qat",
           "save_state", "static_fake_quant", "token_kurtosis_sum", "train"]
