"""The block-by-block calibration pipeline.

Block i is calibrated on inputs that came through the already-quantized blocks 0..i-1, so errors do not compound
unseen; only one block's activations are held at a time (plus the model). Each block runs a sequence of named steps
(BLOCK_STEPS); each step reads and updates the block's BlockState and may return records for the report, under the
step's report key. A new step (a rotation, prefix masking, QAT) is one function and one entry in the sequence:

    steps = BLOCK_STEPS[:2] + (BlockStep("my_step", my_function, report="my_records"),) + BLOCK_STEPS[2:]
    calibrate_blockwise(model, arch, recipe, strategy, ids, steps=steps)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..plugins.api import Architecture, PluginError, Reduction, SiteData, Strategy
from ..quant.layers import install_bmm_quantization, quantize_block, wrap_linears
from ..quant.observers import ActQuantizer, set_fp_prefix, set_observing, set_token_mask
from ..quant.recipes import Recipe
from .blocks import capture_block_inputs, check_finite, hidden_states, run_block, with_hidden_states
from .clipping import search_clipping
from .data import calibration_batches
from .distributed import local_batches, reduce_observed_ranges
from .folding import apply_migration
from .hessians import gptq_block
from .prefix import prefix_key_values, with_prefix


@dataclass
class BlockState:
    """What the steps of one block read and update."""
    model: nn.Module
    arch: Architecture
    recipe: Recipe
    strategy: Strategy
    index: int
    name: str
    block: nn.Module
    calls: list                 # the block's input calls (args, kwargs), one per calibration batch
    masks: list                 # per batch: [batch, tokens] mask of the real tokens, or None
    search_batches: int = 1
    prefix_length: int = 0      # leading tokens of every calibration sequence kept in full precision
    prefix_hidden: list = field(default_factory=list)   # the FP model's hidden states entering each block there
    sites: list = field(default_factory=list)
    rounded_weights: dict = field(default_factory=dict)   # linear name in the block -> GPTQ weight
    reduction: Reduction = field(default_factory=Reduction)   # several processes: their statistics combined


@dataclass(frozen=True)
class BlockStep:
    """One named step of a block's calibration; `run(state)` returns report records (a list) or None."""
    name: str
    run: Callable[[BlockState], Optional[list]]
    report: Optional[str] = None    # the report key its records are appended to


@torch.no_grad()
def _collect_site_inputs(model, block, sites, calls, n_search):
    """One FP pass of the block: each site's consumer input for every batch, and the inspected module's calls
    for the first n_search batches."""
    inputs = {s.name: [] for s in sites}
    module_calls = {s.name: [] for s in sites}
    handles = []
    for s in sites:
        first = model.get_submodule(s.consumers[0])
        handles.append(first.register_forward_pre_hook(
            lambda _m, a, name=s.name: inputs[name].append(a[0].detach())))
        if s.inspect.module is not None:
            handles.append(model.get_submodule(s.inspect.module).register_forward_pre_hook(
                lambda _m, a, k, name=s.name: module_calls[name].append((a, k))
                if len(module_calls[name]) < n_search else None, with_kwargs=True))
    try:
        for _i, call in enumerate(calls):
            run_block(block, call)
    finally:
        for h in handles:
            h.remove()
    return inputs, module_calls


def transforms_model(strategy: Strategy) -> bool:
    """True when the strategy (or a part of a composed one) transforms the whole model before calibration."""
    parts = getattr(strategy, "parts", [strategy])
    return any(type(p).prepare is not Strategy.prepare for p in parts)


@torch.no_grad()
def wrap_block(state: BlockState) -> None:
    """Fake-quant linears (still exact) in place of the block's nn.Linears, and the block's migration sites (but not
    those read through an online rotation: a scale folded into the producer would act before the rotation, which
    the strategies' error does not model)."""
    wrap_linears(state.block)
    state.sites = [s for s in state.arch.sites(state.model, state.index)
                   if any(not state.recipe.keeps_fp(c) for c in s.consumers)
                   and not any(getattr(state.model.get_submodule(c), "input_rotation", None) for c in s.consumers)]


@torch.no_grad()
def migrate_sites(state: BlockState) -> list:
    """The strategy's shift and scale for every site, folded into the model (exact in floating point); one report
    record per site with its channel ranges before and after."""
    model, arch, recipe = state.model, state.arch, state.recipe
    site_inputs, site_calls = _collect_site_inputs(model, state.block, state.sites, state.calls, state.search_batches)
    records = []
    for site in state.sites:
        xs = site_inputs.pop(site.name)
        if not xs:
            raise PluginError(f"architecture {arch.name}: site {site.name} of {state.name} saw no input; "
                              f"is {site.consumers[0]} inside the block?")
        for x in xs:
            check_finite(x, f"the input of {site.consumers[0]}")
        n_search = min(state.search_batches, len(xs))   # with several processes: the search batches held here
        data = SiteData(model=model, site=site, weight_spec=recipe.weights,
                        act_spec=recipe.activation_spec(site.consumers[0]),
                        inputs=xs, search_inputs=xs[:n_search], token_masks=state.masks,
                        fp_prefix=state.prefix_length,
                        calls=site_calls[site.name][:n_search] or [None] * n_search,
                        quantized=[not recipe.keeps_fp(c) for c in site.consumers],
                        scale_search_min=arch.scale_search_min, smoothquant_alpha=arch.smoothquant_alpha,
                        shift_foldable=site.producer_kind == "layernorm" and
                        getattr(model.get_submodule(site.producer), "bias", None) is not None,
                        reduction=state.reduction)
        lo, hi = data.channel_min(), data.channel_max()
        migration = state.strategy.migrate(data)
        entry = {"block": state.index, "site": site.name, "consumers": site.consumers,
                 "range_before": (lo.cpu(), hi.cpu()), "range_after": (lo.cpu(), hi.cpu())}
        if migration is not None:
            apply_migration(model, site, migration)
            z = migration.shift if migration.shift is not None else torch.zeros_like(lo)
            s = migration.scale if migration.scale is not None else torch.ones_like(lo)
            z, s = z.to(lo.device).float(), s.to(lo.device).float()
            entry["range_after"] = (((lo - z) / s).cpu(), ((hi - z) / s).cpu())
            entry["migration"] = {"shift": migration.shift is not None, "runtime_shift": migration.runtime_shift,
                                  "scale_max": float(s.max()), **migration.info}
            entry["shift_values"] = None if migration.shift is None else migration.shift.detach().cpu()
            entry["scale_values"] = s.cpu()
            if site.block_input:  # post-LN: the cached block inputs are the producer's outputs
                state.calls = [_transformed_input(c, z, s) for c in state.calls]
        records.append(entry)
        del data, xs
    return records


def _transformed_input(call, z: torch.Tensor, s: torch.Tensor):
    h = hidden_states(call)
    return with_hidden_states(call, (h - z.to(h.dtype)) / s.to(h.dtype))


@torch.no_grad()
def round_weights_gptq(state: BlockState) -> list:
    """Recipes with weights.rounding gptq: the GPTQ rounding of the block's linears (used by quantize_weights);
    one report record per linear with both roundings' output errors."""
    if state.recipe.weights.rounding != "gptq":
        return []
    state.rounded_weights, records = gptq_block(state.block, state.name, state.recipe, state.calls, state.masks,
                                                state.reduction)
    return records


@torch.no_grad()
def quantize_weights(state: BlockState) -> None:
    """Fake-quantize the weights of the linears the recipe quantizes and attach their activation quantizers."""
    quantize_block(state.block, state.name, state.recipe, state.rounded_weights)
    set_fp_prefix(state.block, state.prefix_length)


@torch.no_grad()
def observe_activations(state: BlockState) -> None:
    """Static activation quantizers record their ranges over the calibration batches (real tokens only); then every
    quantizer of the block quantizes."""
    block = state.block
    if any(isinstance(m, ActQuantizer) and not m.spec.dynamic for m in block.modules()):
        set_observing(block, True)
        for call, mask in zip(state.calls, state.masks):
            set_token_mask(block, mask)
            run_block(block, call)
        set_token_mask(block, None)
        if state.reduction.world_size > 1:
            reduce_observed_ranges(block, state.reduction)
    set_observing(block, False)


@torch.no_grad()
def clip_activations(state: BlockState) -> list:
    """Observer "search": token-wise clipping ranges chosen by the block's output error (calibrate/clipping.py)."""
    return search_clipping(state.block, state.name, state.sites, state.calls, state.masks)


@torch.no_grad()
def propagate(state: BlockState) -> None:
    """The quantized block's outputs become the next block's inputs; at the prefix positions, the floating-point
    model's (the quantized model reads the prefix's keys and values from the FP model, so it is calibrated so)."""
    calls = []
    following = state.index + 1
    for call in state.calls:
        h = run_block(state.block, call)
        check_finite(h, f"the output of quantized block {state.name}")
        if state.prefix_length and following < len(state.prefix_hidden):
            h = h.clone()
            h[:, :state.prefix_length] = state.prefix_hidden[following].to(h.dtype)
        calls.append(with_hidden_states(call, h))
    state.calls = calls


def given_activation_ranges(ranges: dict) -> BlockStep:
    """A step in place of "observe": every static activation quantizer of a block linear takes its range from
    `ranges` ({linear full name: (lo, hi)}, e.g. learned by quantization-aware training) instead of observing."""
    @torch.no_grad()
    def run(state: BlockState) -> None:
        for name, m in state.block.named_modules():
            if isinstance(m, ActQuantizer) and not m.spec.dynamic:
                linear = f"{state.name}.{name.rpartition('.')[0]}"
                if linear not in ranges:
                    raise PluginError(f"no activation range given for {linear} (static activation quantizer "
                                      f"{state.name}.{name})")
                lo, hi = ranges[linear]
                m.set_range(float(lo), float(hi))
        set_observing(state.block, False)
    return BlockStep("observe", run)


BLOCK_STEPS = (
    BlockStep("wrap", wrap_block),
    BlockStep("migrate", migrate_sites, report="sites"),
    BlockStep("gptq", round_weights_gptq, report="gptq"),
    BlockStep("quantize", quantize_weights),
    BlockStep("observe", observe_activations),
    BlockStep("clip", clip_activations, report="clipping"),
    BlockStep("propagate", propagate),
)


def _prepare_bmm_quantization(model: nn.Module, arch: Architecture, recipe: Recipe) -> None:
    if not recipe.bmm_inputs:
        return
    attn = arch.attention_modules(model)
    if not attn:
        raise PluginError(f"recipe field 'bmm_inputs': architecture {arch.name} does not support BMM-input "
                          "quantization")
    install_bmm_quantization(model, attn, recipe.activations)
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.mode = "off"   # switched on block by block, once the block is quantized (observe_activations)


@torch.no_grad()
def calibrate_blockwise(model: nn.Module, arch: Architecture, recipe: Recipe, strategy: Strategy,
                        token_ids, batch_size: int = 4, search_batches: int = 1,
                        progress: bool = True, steps: tuple = BLOCK_STEPS, prefix: Sequence[int] = (),
                        checkpoints=None, reduction: Optional[Reduction] = None, residency=None) -> dict:
    """Quantize `model` in place, block by block, running `steps` on each block. Returns the report: the records
    of each step under its report key (per-site migrations and channel ranges, clipping, GPTQ errors) and the time
    each step took. token_ids: [n, T] ids, or a dict with input_ids and attention_mask (padded samples: padding
    tokens are left out of the channel ranges, the strategy's error and the activation observers).

    prefix: token ids (calibrate/prefix.py) that every sample runs after, kept in full precision: the activation
    quantizers leave their positions unquantized, and no statistic (channel ranges, the strategy's error,
    observers, GPTQ Hessians, clipping) counts them; between blocks they carry the floating-point model's hidden
    states. The quantized model then runs behind the prefix's keys and values, computed once by the floating-point
    model (model.osengine_prefix, model.osengine_prefix_kv: calibrate/prefix.py).

    checkpoints: an object with `restore(model, block_names)` -> None or (finished blocks, the next block's input
    calls, the report so far), called once the model is prepared (it puts the finished blocks back), and
    `save(index, model, block_names, calls, report)`, called after each block (osengine.io.progress: resumable
    runs).

    reduction: several processes (calibrate/distributed.py): each calls this with the same token_ids, keeps its
    share of the batches and combines the statistics of every block with the others.

    residency: a model larger than memory (osengine.io.streaming): `release_outside()` once the first block's
    inputs are captured, `load_block(model, index, name)` before a block's steps and `release_block(model, index,
    name)` after them (the block's tensors go to disk)."""
    device = next(model.parameters()).device
    if residency is not None and transforms_model(strategy):
        raise PluginError(f"strategy {strategy.name} transforms the whole model before calibration (e.g. a "
                          "rotation), which needs every weight in memory; it cannot stream a model larger than "
                          "memory (max_memory) in this version")
    transforms = strategy.prepare(model, arch)   # before anything is measured: the prefix's keys and values too
    prefix = [int(t) for t in prefix]
    if prefix and recipe.bmm_inputs:
        raise PluginError("a full-precision prefix cannot be combined with recipe field 'bmm_inputs' (quantized "
                          "attention inputs) in this version")
    if prefix:
        token_ids = with_prefix(token_ids, prefix)
    prefix_kv, prefix_hidden = prefix_key_values(model, prefix)   # before any block changes
    batches, masks = calibration_batches(token_ids, batch_size, device)
    if prefix:  # the prefix positions are attended to but never measured
        masks = [torch.ones_like(b["input_ids"], dtype=torch.bool) if m is None else m.clone()
                 for b, m in zip(batches, masks)]
        for m in masks:
            m[:, :len(prefix)] = False
    reduction = reduction or Reduction()
    if reduction.world_size > 1:
        if not strategy.distributed:
            raise PluginError(f"strategy {strategy.name} computes statistics of its own that are not combined "
                              "across processes; it runs in one process only (strategies that run distributed: "
                              "those with distributed = True, e.g. minmax, smoothquant, osplus)")
        if checkpoints is not None:
            raise PluginError("resumable progress is not supported with several processes in this version")
        batches, masks, search_batches = local_batches(batches, masks, search_batches, reduction)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    block_names = arch.blocks(model)
    if not block_names:
        raise PluginError(f"architecture {arch.name} found no blocks in the model")
    _prepare_bmm_quantization(model, arch, recipe)
    report = {"architecture": arch.name, "strategy": strategy.name, "recipe": recipe.to_dict(), "prefix": prefix,
              "model_transforms": transforms or {},
              **{s.report: [] for s in steps if s.report}, "step_seconds": {s.name: 0.0 for s in steps}}
    t0 = time.time()
    restored = checkpoints.restore(model, block_names) if checkpoints is not None else None
    start = 0
    if restored is not None:
        start, calls, saved = restored
        report.update({k: v for k, v in saved.items() if k in report})
        report["resumed_at_block"] = start
        for name in block_names[:start]:   # as observe_activations and quantize_weights left them
            set_observing(model.get_submodule(name), False)
            set_fp_prefix(model.get_submodule(name), len(prefix))
    else:
        calls = capture_block_inputs(model, model.get_submodule(block_names[0]), batches)
        for c in calls:
            check_finite(hidden_states(c), "the embeddings")
    if residency is not None:
        residency.release_outside()
    bar = tqdm(block_names[start:], desc=f"calibrating ({strategy.name}, {recipe.name})", disable=not progress,
               initial=start, total=len(block_names))
    for index, block_name in enumerate(bar, start=start):
        if residency is not None:
            residency.load_block(model, index, block_name)
        state = BlockState(model=model, arch=arch, recipe=recipe, strategy=strategy, index=index, name=block_name,
                           block=model.get_submodule(block_name), calls=calls, masks=masks,
                           search_batches=search_batches, prefix_length=len(prefix), prefix_hidden=prefix_hidden,
                           reduction=reduction)
        for step in steps:
            started = time.time()
            records = step.run(state)
            report["step_seconds"][step.name] += time.time() - started
            if step.report and records:
                report[step.report] += records
        calls = state.calls
        if checkpoints is not None:
            started = time.time()
            checkpoints.save(index, model, block_names, calls, report)
            report["progress_seconds"] = report.get("progress_seconds", 0.0) + time.time() - started
        if residency is not None:
            residency.release_block(model, index, block_name)
    report["calibration_seconds"] = time.time() - t0
    set_fp_prefix(model, 0)   # the quantized model never computes the prefix: it reads the stored keys and values
    model.osengine_prefix = prefix
    model.osengine_prefix_kv = prefix_kv
    return report
