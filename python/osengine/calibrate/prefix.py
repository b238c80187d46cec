"""Outlier tokens ("massive activations"): the few tokens whose linear inputs are orders of magnitude larger than
every other token's, such as the first position of a sequence (the attention sink) and some frequent delimiters. One
static per-tensor activation scale cannot serve them and the rest; PrefixQuant (Chen et al. 2024) takes them out of
the quantized computation by keeping them as a full-precision prefix of the KV cache. This module finds them and
chooses that prefix from the data.

Measure. For every block and every linear input of it (linears that read one tensor, as q/k/v, count once), each
real token's max |x| over channels divided by the median of those maxima over all real tokens of the calibration
data. A token whose ratio exceeds `threshold` (64, as PrefixQuant) is an outlier. With a prefix, every sample runs
after it (the model sees prefix + sample) and the prefix positions are left out of the statistics.

Choice. No outliers: no prefix. Otherwise, greedily: the model's BOS token first when outliers sit at the first
position (any first token becomes the sink; a fixed BOS in front takes that role), then the token id with the most
outlier occurrences (at least `min_occurrences`: a prefix serves recurring tokens), kept only when measuring again
shows fewer outlier occurrences, until no such token remains or `max_length` is reached. Outliers of a token already
in the prefix (e.g. a second BOS) or of rare tokens are reported, not absorbed.
"""
from __future__ import annotations

import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..plugins.api import Architecture
from .data import CalibrationError

OUTLIER_THRESHOLD = 64.0


@dataclass(frozen=True)
class OutlierToken:
    block: int
    linear: str      # the first linear (name relative to its block) that reads the input
    sample: int
    position: int    # in the sample (prefix positions not counted)
    token_id: int
    ratio: float


@dataclass
class OutlierReport:
    """One measurement: per block and linear input, the largest per-token ratio; every outlier token."""
    threshold: float
    prefix: list                                  # token ids in front of every sample (not measured)
    worst: dict = field(default_factory=dict)     # block index -> {linear: largest ratio}
    tokens: list = field(default_factory=list)    # OutlierToken, largest ratio first

    def block_worst(self) -> list:
        """Per block, the largest ratio over its linear inputs."""
        return [max(self.worst[b].values()) for b in sorted(self.worst)]

    def worst_ratio(self) -> float:
        return max(self.block_worst(), default=0.0)

    def counts(self) -> Counter:
        """Outlier (sample, position) occurrences per token id (each counted once however many linears flag it)."""
        seen = {(t.sample, t.position, t.token_id) for t in self.tokens}
        return Counter(token_id for _, _, token_id in seen)

    def first_position_samples(self) -> int:
        """Samples whose first token is an outlier."""
        return len({t.sample for t in self.tokens if t.position == 0})

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "prefix": list(self.prefix),
                "block_worst": [round(r, 2) for r in self.block_worst()],
                "outlier_tokens": {str(k): v for k, v in self.counts().most_common()},
                "first_position_samples": self.first_position_samples()}


def _measured_linears(model: nn.Module, arch: Architecture, block_index: int) -> list:
    """(relative name, module) of the block's linears, one per input tensor (the first of q/k/v, of gate/up)."""
    block_name = arch.block(model, block_index)
    block = model.get_submodule(block_name)
    shared = {name for group in arch.shared_input_groups(model) for name in group[1:]}
    return [(name, m) for name, m in block.named_modules()
            if isinstance(m, nn.Linear) and f"{block_name}.{name}" not in shared]


def with_prefix(token_ids, prefix: Sequence[int]) -> dict:
    """Calibration samples run after `prefix`: {input_ids, attention_mask} with the prefix in front of every
    sample (attended to by every token). Samples that all begin with the prefix's first token (text the model
    generated from its BOS) lose that token: the prefix is their beginning."""
    if isinstance(token_ids, dict):
        ids, mask = token_ids["input_ids"], token_ids["attention_mask"]
    else:
        ids, mask = token_ids, torch.ones_like(token_ids)
    if prefix and ids.shape[1] > 1 and bool((ids[:, 0] == prefix[0]).all()) and bool(mask[:, 0].all()):
        ids, mask = ids[:, 1:], mask[:, 1:]
    front = torch.tensor(list(prefix), dtype=ids.dtype).expand(ids.shape[0], -1)
    return {"input_ids": torch.cat([front, ids], dim=1), "attention_mask": torch.cat([torch.ones_like(front), mask], 1)}


class _PastTheLastBlock(Exception):
    pass


@torch.no_grad()
def measure_outlier_tokens(model: nn.Module, arch: Architecture, input_ids: torch.Tensor,
                           attention_mask: Optional[torch.Tensor] = None, prefix: Sequence[int] = (),
                           threshold: float = OUTLIER_THRESHOLD, batch_size: int = 4) -> OutlierReport:
    """The outlier tokens of `input_ids` [samples, tokens] (`attention_mask`: 1 for real tokens) run after `prefix`
    through the floating-point model."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise CalibrationError("outlier detection needs token ids [samples, tokens], got shape "
                               f"{tuple(input_ids.shape)}")
    if not threshold > 1.0:
        raise ValueError(f"outlier threshold must be > 1 (a ratio to the median token), got {threshold}")
    p = len(prefix)
    placed = with_prefix(input_ids if attention_mask is None else
                         {"input_ids": input_ids, "attention_mask": attention_mask}, prefix)
    input_ids, mask = placed["input_ids"][:, p:], placed["attention_mask"][:, p:].bool()   # the samples' own
    n_blocks = len(arch.blocks(model))
    linears = {b: _measured_linears(model, arch, b) for b in range(n_blocks)}
    maxima = {(b, name): [] for b in linears for name, _ in linears[b]}   # per batch: [batch, tokens]

    def hook(key):
        def record(_module, args):
            x = args[0]
            if x.dim() == 3:   # [batch, tokens, channels]; the prefix positions are not measured
                maxima[key].append(x[:, p:].detach().abs().amax(dim=-1).float().cpu())
        return record

    def stop(_module, _args, _output):
        raise _PastTheLastBlock

    handles = [m.register_forward_pre_hook(hook((b, name))) for b in linears for name, m in linears[b]]
    # nothing after the last block is measured: stop there (no lm_head logits over the whole vocabulary)
    handles.append(model.get_submodule(arch.blocks(model)[-1]).register_forward_hook(stop))
    device = next(model.parameters()).device
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids=placed["input_ids"][i:i + batch_size].to(device),
                      attention_mask=placed["attention_mask"][i:i + batch_size].to(device))
            except _PastTheLastBlock:
                pass
    finally:
        for h in handles:
            h.remove()

    report = OutlierReport(threshold=threshold, prefix=list(prefix))
    flat_ids, flat_mask = input_ids.cpu(), mask.cpu()
    for (b, name), per_batch in maxima.items():
        if not per_batch:
            continue
        token_max = torch.cat(per_batch)                       # [samples, tokens]
        real = token_max[flat_mask]
        median = real.median().clamp(min=torch.finfo(torch.float32).tiny)
        ratio = torch.where(flat_mask, token_max / median, torch.zeros_like(token_max))
        report.worst.setdefault(b, {})[name] = float(ratio.max())
        for sample, position in (ratio > threshold).nonzero().tolist():
            report.tokens.append(OutlierToken(b, name, sample, position, int(flat_ids[sample, position]),
                                              float(ratio[sample, position])))
    report.tokens.sort(key=lambda t: -t.ratio)
    return report


@torch.no_grad()
def choose_prefix(model: nn.Module, arch: Architecture, input_ids: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None, bos_token_id: Optional[int] = None,
                  threshold: float = OUTLIER_THRESHOLD, max_length: int = 4, min_occurrences: int = 2,
                  batch_size: int = 4) -> tuple:
    """(prefix token ids, the measurements: without a prefix first, then after each accepted addition). See the
    module docstring for the rule; a token other than the sink is a candidate when it is an outlier at least
    `min_occurrences` times, and is kept only when it lowers the number of outlier occurrences."""
    if max_length < 0:
        raise ValueError(f"max_length must be >= 0, got {max_length}")
    reports = [measure_outlier_tokens(model, arch, input_ids, attention_mask, (), threshold, batch_size)]
    prefix: list = []
    rejected: set = set()
    while len(prefix) < max_length and reports[-1].tokens:
        current = reports[-1]
        sink = not prefix and current.first_position_samples() > 0
        if sink:  # any first token is a sink; a fixed BOS in front takes the role
            candidate = bos_token_id if bos_token_id is not None else \
                Counter(int(t) for t in input_ids[:, 0].tolist()).most_common(1)[0][0]
        else:
            frequent = [tok for tok, n in current.counts().most_common()
                        if n >= min_occurrences and tok not in prefix and tok not in rejected]
            if not frequent:
                break
            candidate = frequent[0]
        trial = measure_outlier_tokens(model, arch, input_ids, attention_mask, prefix + [int(candidate)], threshold,
                                       batch_size)
        if not sink and sum(trial.counts().values()) >= sum(current.counts().values()):
            rejected.add(candidate)   # it does not take the outliers' role: leave it out
            continue
        prefix.append(int(candidate))
        reports.append(trial)
    return prefix, reports


def plot_outlier_ratios(reports: Sequence[OutlierReport], path, labels: Optional[Sequence[str]] = None) -> None:
    """Per block, the largest per-token ratio (log scale) of each measurement, with the threshold."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, r in enumerate(reports):
        label = labels[i] if labels else (f"prefix {r.prefix}" if r.prefix else "no prefix")
        ax.plot(range(len(r.block_worst())), r.block_worst(), marker="o", label=label)
    if reports:
        ax.axhline(reports[0].threshold, color="grey", linestyle="--", label=f"threshold {reports[0].threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("max token |x|max / median token")
    ax.set_title("Outlier tokens of the linear inputs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the prefix as a fixed start of the KV cache ----------------------------------------------------------------
# A quantized model never computes its prefix: the prefix's keys and values come from the floating-point model (one
# pass before calibration; OS+'s migrations keep every block's output, so this is the migrated model's prefix too)
# and stand in front of every sequence's cache, as PrefixQuant keeps them. model.osengine_prefix holds the ids,
# model.osengine_prefix_kv the per-layer (keys, values), each [kv_heads, prefix length, head_dim] in float32, keys
# after RoPE at positions 0 .. length - 1. The sequence's own tokens follow at positions length, length + 1, ...


def _cache_layers(cache) -> list:
    """[(keys, values)] of a transformers cache, each [batch, kv_heads, tokens, head_dim]."""
    if hasattr(cache, "layers"):                 # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


@torch.no_grad()
def prefix_key_values(model: nn.Module, prefix: Sequence[int]) -> tuple:
    """(the prefix's keys and values per layer as described above, the hidden states entering each block at the
    prefix positions [1, length, hidden]), from one pass of `model` (the floating-point model) over `prefix`."""
    if not prefix:
        return [], []
    device = next(model.parameters()).device
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    with _quiet_cache_warnings():
        out = model(input_ids=ids, use_cache=True, output_hidden_states=True)
    kv = [(k[0].detach().float().clone(), v[0].detach().float().clone()) for k, v in _cache_layers(out.past_key_values)]
    for i, (k, v) in enumerate(kv):
        if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise CalibrationError(f"the prefix {list(prefix)} gives non-finite keys or values in layer {i}")
    return kv, [h.detach() for h in out.hidden_states[:-1]]


def prefix_cache(model: nn.Module, batch: int):
    """A transformers DynamicCache holding the model's prefix keys and values for `batch` sequences (None for a
    model without a prefix)."""
    from transformers import DynamicCache

    kv = getattr(model, "osengine_prefix_kv", None)
    if not kv:
        return None
    param = next(model.parameters())
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k.to(param.device, param.dtype).unsqueeze(0).expand(batch, -1, -1, -1).contiguous(),
                     v.to(param.device, param.dtype).unsqueeze(0).expand(batch, -1, -1, -1).contiguous(), i)
    return cache


@contextmanager
def _quiet_cache_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")   # transformers 5 renames it
        yield


def run_after_prefix(model: nn.Module, input_ids: torch.Tensor, past=None, **kwargs):
    """model(input_ids, ...) for a causal LM that may run behind a stored prefix: the first call of a sequence
    (past None) starts from the prefix's cache; later calls pass the returned past_key_values. Positions and the
    attention mask cover the prefix; the outputs are the sequence's own. Without a prefix, a plain call."""
    batch, tokens = input_ids.shape
    if past is None:
        past = prefix_cache(model, batch)
    if past is None:   # no prefix, first call: a plain call (models without a KV cache argument work too)
        return model(input_ids=input_ids, **kwargs)
    kwargs["use_cache"] = True
    seen = past.get_seq_length()
    kwargs["attention_mask"] = torch.ones(batch, seen + tokens, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(seen, seen + tokens, device=input_ids.device)
    kwargs["position_ids"] = positions.unsqueeze(0).expand(batch, -1)
    with _quiet_cache_warnings():
        return model(input_ids=input_ids, past_key_values=past, **kwargs)
