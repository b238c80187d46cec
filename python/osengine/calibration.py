"""Calibration data and the block-by-block driver.

Block i is calibrated on inputs that came through the already-quantized blocks 0..i-1; only one block's
activations are held at a time (plus the model).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .gptq import gptq_quantize_weight
from .plugin_api import (Architecture, Migration, PluginError, SiteData, Strategy, apply_migration)
from .quantizers import ActQuantizer, FakeQuantLinear, install_bmm_quantization, quantize_weight
from .recipes import Recipe


class CalibrationError(ValueError):
    """Calibration data is missing, empty, too short or not finite."""


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

def text_samples(text: str, tokenizer, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """n_samples windows of seq_len tokens drawn (without overlap, reproducibly) from the tokenized text."""
    if not text.strip():
        raise CalibrationError("calibration text is empty")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < 8:
        raise CalibrationError(f"calibration text has only {ids.numel()} tokens; need at least 8")
    seq_len = min(seq_len, ids.numel())
    windows = ids.numel() // seq_len
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows, generator=g)[:n_samples].sort().values
    return torch.stack([ids[i * seq_len:(i + 1) * seq_len] for i in chosen.tolist()])


class _GenerationProgress:
    """A `generate` streamer that only advances a progress bar: one step per generated token (all samples)."""

    def __init__(self, steps: int, disable: bool):
        self.bar = tqdm(total=steps, desc="generating samples", unit="tok", disable=disable)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate hands the prompt over first
            self.prompt_seen = True
            return
        self.bar.update(1)

    def end(self) -> None:
        self.bar.close()


@torch.no_grad()
def generated_samples(model, tokenizer, n_samples: int, seq_len: int, seed: int = 0,
                      progress: bool = False) -> torch.Tensor:
    """Calibration text written by the model itself, starting from its BOS token (no data needed)."""
    if not (hasattr(model, "can_generate") and model.can_generate()):
        raise CalibrationError("calibration 'generated' needs a causal language model; "
                               "give a text file (--calib FILE) for encoders")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise CalibrationError("calibration 'generated' needs a tokenizer with a BOS or EOS token")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    start = torch.full((n_samples, 1), bos, dtype=torch.long, device=device)
    out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=50, top_p=0.95,
                         max_new_tokens=seq_len, min_new_tokens=seq_len, pad_token_id=bos,
                         eos_token_id=None, streamer=_GenerationProgress(seq_len, disable=not progress))
    return out[:, 1:seq_len + 1].cpu()


def sentence_samples(sentences: Sequence[str], tokenizer, n_samples: int, seq_len: int, seed: int = 0) -> dict:
    """n_samples items of `sentences` (drawn reproducibly, kept in order), each tokenized on its own the way an
    encoder sees it at inference ([CLS] ... [SEP] for BERT), truncated to seq_len and padded; `attention_mask`
    marks the real tokens (padding is excluded from every calibration statistic)."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(sentences), generator=g)[:n_samples].sort().values
    enc = tokenizer([sentences[i] for i in chosen.tolist()], padding=True, truncation=True, max_length=seq_len,
                    return_tensors="pt")
    if enc["input_ids"].numel() == 0 or not enc["attention_mask"].any():
        raise CalibrationError("calibration sentences produced no tokens")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def _is_encoder(model) -> bool:
    return not (hasattr(model, "can_generate") and model.can_generate())


def load_calibration(source, model, tokenizer, n_samples: int = 16, seq_len: int = 512,
                     per_sample: Optional[bool] = None, progress: bool = False):
    """source: a text file path, "generated", a list of strings, an integer tensor of token ids [n, T], or a dict
    {"input_ids": [n, T], "attention_mask": [n, T]} (padded samples).

    A list of strings is cut into n_samples windows of seq_len tokens of the joined text (language models), or,
    with per_sample (the default for encoders, which never see text across sentence boundaries nor without their
    special tokens), tokenized item by item into n_samples padded samples. Returns token ids [n, T], or a dict
    with an attention mask when the samples are padded."""
    if n_samples < 1 or seq_len < 1:
        raise CalibrationError(f"n_samples and seq_len must be positive, got {n_samples} and {seq_len}")
    if isinstance(source, dict):
        ids, mask = source.get("input_ids"), source.get("attention_mask")
        if not isinstance(ids, torch.Tensor) or not isinstance(mask, torch.Tensor) or ids.shape != mask.shape \
                or ids.dim() != 2:
            raise CalibrationError("calibration dict must hold 'input_ids' and 'attention_mask' tensors of the same "
                                   "shape [n, T]")
        if ids.is_floating_point():
            raise CalibrationError("calibration 'input_ids' must hold integer token ids")
        if ids.numel() == 0 or not mask.any():
            raise CalibrationError("calibration tensor is empty")
        return {"input_ids": ids.long(), "attention_mask": mask.long()}
    if isinstance(source, torch.Tensor):
        if source.is_floating_point():
            raise CalibrationError("calibration tensor must hold integer token ids, got a floating-point tensor"
                                   + (" with NaN values" if torch.isnan(source).any() else ""))
        if source.numel() == 0:
            raise CalibrationError("calibration tensor is empty")
        return source.reshape(-1, source.shape[-1]).long()
    if isinstance(source, (list, tuple)):
        if not source or not all(isinstance(s, str) for s in source):
            raise CalibrationError("calibration list must be a non-empty list of strings")
        if per_sample if per_sample is not None else _is_encoder(model):
            return sentence_samples(source, tokenizer, n_samples, seq_len)
        return text_samples("\n\n".join(source), tokenizer, n_samples, seq_len)
    if isinstance(source, (str, Path)):
        if str(source) == "generated":
            return generated_samples(model, tokenizer, n_samples, seq_len, progress=progress)
        path = Path(source)
        if not path.is_file():
            raise CalibrationError(f"calibration file {str(path)!r} does not exist (or say 'generated')")
        return text_samples(path.read_text(encoding="utf-8", errors="replace"), tokenizer, n_samples, seq_len)
    raise CalibrationError(f"calibration must be a file path, 'generated', a list of strings or token ids; "
                           f"got {type(source).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Block-by-block driver
# ----------------------------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _hidden(call):
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(call, h):
    args, kwargs = call
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, hidden_states=h)


def _run_block(block, call):
    args, kwargs = call
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: Sequence[dict]) -> list:
    """Run the model up to its first block and keep that block's call (args, kwargs) for every batch."""
    calls = []

    def hook(_m, args, kwargs):
        calls.append((args, kwargs))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(**b)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(calls) != len(batches):
        raise PluginError("the architecture's first block was not called by the model's forward")
    return calls


def wrap_linears(block: nn.Module) -> None:
    """Replace every nn.Linear in the block by an (initially exact, floating-point) FakeQuantLinear."""
    for name, m in list(block.named_modules()):
        if type(m) is nn.Linear:
            block.set_submodule(name, FakeQuantLinear(m))


def quantize_block(block: nn.Module, block_name: str, recipe: Recipe, weights: Optional[dict] = None) -> list:
    """Quantize the block's linears that the recipe does not keep in floating point; `weights` maps a linear's
    name (in the block) to its already quantized weight (GPTQ), used instead of rounding to nearest."""
    quantized = []
    for name, m in block.named_modules():
        if isinstance(m, FakeQuantLinear) and not recipe.keeps_fp(f"{block_name}.{name}"):
            for spec, where in ((recipe.weights, "weights"), (recipe.activations, "activations")):
                if spec.granularity == "per-group" and m.in_features % spec.group_size:
                    raise PluginError(f"recipe field '{where}.group_size' ({spec.group_size}) does not divide "
                                      f"the {m.in_features} input channels of {block_name}.{name}")
            m.quantize(recipe.weights, recipe.activations, weight=(weights or {}).get(name))
            quantized.append(name)
    return quantized


@torch.no_grad()
def collect_hessians(block: nn.Module, block_name: str, recipe: Recipe, calls: list, masks: list) -> dict:
    """For each linear of the block that will be quantized: the sum over the real calibration tokens of x x^T
    (fp32, [in, in]), x being its input as the quantizer will see it (after a runtime shift). One pass of the block
    in floating point; linears reading the same tensor (q/k/v, gate/up) share one sum."""
    linears = {n: m for n, m in block.named_modules()
               if isinstance(m, FakeQuantLinear) and not recipe.keeps_fp(f"{block_name}.{n}")}
    sums, owner, seen, current_mask = {}, {}, [], [None]

    def hook(m, args, name):
        for other_input, other_shift, other_name in seen:  # the same tensor as a sibling (kept alive, so identity
            if other_input is args[0] and other_shift is m.input_shift:  # is safe): share its sum
                owner[name] = other_name
                return
        seen.append((args[0], m.input_shift, name))
        x = args[0] if m.input_shift is None else args[0] - m.input_shift
        mask = current_mask[0]
        rows = x[mask] if mask is not None and tuple(x.shape[:2]) == tuple(mask.shape) else x.reshape(-1, x.shape[-1])
        rows = rows.float()
        sums[name] = sums.get(name, 0) + rows.T @ rows
        owner[name] = name

    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: hook(mod, a, n)) for n, m in linears.items()]
    try:
        for call, mask in zip(calls, masks):
            seen.clear()
            current_mask[0] = mask
            _run_block(block, call)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[owner[n]] for n in linears if n in owner}


def gptq_block(block: nn.Module, block_name: str, recipe: Recipe, calls: list, masks: list) -> tuple:
    """(GPTQ-rounded weights by linear name, report entries): each entry gives the layer's output error
    sum ||(W - Q) x||^2 over the calibration tokens for round-to-nearest and for GPTQ, relative to sum ||W x||^2."""
    hessians = collect_hessians(block, block_name, recipe, calls, masks)
    weights, entries = {}, []
    for name, h in hessians.items():
        w = block.get_submodule(name).weight.detach()
        q = gptq_quantize_weight(w, h, recipe.weights)
        energy = float(torch.einsum("oi,ij,oj->", w.float(), h, w.float())) or 1.0
        err = {kind: float(torch.einsum("oi,ij,oj->", d, h, d)) / energy
               for kind, d in (("nearest", (w.float() - quantize_weight(w.float(), recipe.weights))),
                               ("gptq", (w.float() - q.float())))}
        weights[name] = q
        entries.append({"block": block_name, "linear": name, "relative_error_nearest": err["nearest"],
                        "relative_error_gptq": err["gptq"]})
    return weights, entries


def set_observing(module: nn.Module, observing: bool) -> None:
    for m in module.modules():
        if isinstance(m, ActQuantizer):
            m.mode = "observe" if observing and not m.spec.dynamic else "quantize"


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
        for i, call in enumerate(calls):
            _run_block(block, call)
    finally:
        for h in handles:
            h.remove()
    return inputs, module_calls


def set_token_mask(module: nn.Module, mask: Optional[torch.Tensor]) -> None:
    """Tell the activation observers under `module` which tokens of the next batch are real (None: all)."""
    for m in module.modules():
        if isinstance(m, ActQuantizer):
            m.token_mask = mask


def _block_outputs(block: nn.Module, calls: list) -> list:
    return [_run_block(block, c) for c in calls]


def _output_error(outputs: list, targets: list, masks: list) -> float:
    """Sum of squared differences over the real tokens of every batch."""
    total = 0.0
    for out, target, mask in zip(outputs, targets, masks):
        diff = (out.float() - target.float())
        if mask is not None and diff.dim() >= 2 and tuple(diff.shape[:2]) == tuple(mask.shape):
            diff = diff[mask]
        total += float(diff.pow(2).sum())
    return total


@torch.no_grad()
def search_clipping(block: nn.Module, block_name: str, sites: list, calls: list, masks: list) -> list:
    """Observer "search": for each static activation quantizer of the block (those reading one site's input as
    one), in the block's order, keep the candidate range (quantiles of the per-token extremes, MinMax first) that
    gives the least squared error of the block's output against the same block with its activations unquantized
    (weights quantized), over the calibration batches. Earlier choices stay in place while later ones are searched.
    Returns one report entry per quantizer group."""
    site_of = {c: s.name for s in sites for c in s.consumers}
    groups: dict = {}
    for name, m in block.named_modules():
        if isinstance(m, ActQuantizer) and not m.spec.dynamic and m.spec.observer == "search":
            owner = name[:-len(".act_quant")] if name.endswith(".act_quant") else name
            key = site_of.get(f"{block_name}.{owner}", owner)
            groups.setdefault(key, []).append((owner, m))
    if not groups:
        return []
    quantizers = [m for m in block.modules() if isinstance(m, ActQuantizer)]
    saved = [m.mode for m in quantizers]
    for m in quantizers:
        m.mode = "off"
    targets = _block_outputs(block, calls)
    for m, mode in zip(quantizers, saved):
        m.mode = mode
    entries = []
    for key, members in groups.items():
        candidates = members[0][1].clip_candidates()
        scored = []  # (block output error, quantile, lo, hi), MinMax first
        for q, lo, hi in candidates:
            for _, m in members:
                m.set_range(lo, hi)
            scored.append((_output_error(_block_outputs(block, calls), targets, masks), q, lo, hi))
        err, q, lo, hi = min(scored, key=lambda e: e[0])  # the first of equals: the widest range
        for _, m in members:
            m.set_range(lo, hi)
            m.token_extremes = []
        entries.append({"block": block_name, "quantizers": [owner for owner, _ in members], "quantile": q,
                        "range": (lo, hi), "minmax_range": candidates[0][1:], "output_error": err,
                        "minmax_output_error": scored[0][0]})
    return entries


def _check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise CalibrationError(f"non-finite activations (NaN or inf) in {where}; check the calibration data and "
                               "the model's dtype")


def calibration_batches(token_ids, batch_size: int, device) -> tuple:
    """Model inputs per batch, and per batch the [B, T] boolean mask of real (non-padding) tokens, or None when
    the batch has no padding. Padded batches are trimmed to their longest sample."""
    if isinstance(token_ids, dict):
        ids, mask = token_ids["input_ids"], token_ids["attention_mask"]
    else:
        ids, mask = token_ids, torch.ones_like(token_ids)
    batches, masks = [], []
    for i in range(0, ids.shape[0], batch_size):
        b_ids, b_mask = ids[i:i + batch_size], mask[i:i + batch_size]
        used = b_mask.any(0).nonzero()
        end = int(used.max()) + 1 if used.numel() else b_ids.shape[1]
        b_ids, b_mask = b_ids[:, :end].to(device), b_mask[:, :end].to(device)
        batches.append({"input_ids": b_ids, "attention_mask": b_mask})
        masks.append(None if bool(b_mask.all()) else b_mask.bool())
    return batches, masks


@torch.no_grad()
def calibrate_blockwise(model: nn.Module, arch: Architecture, recipe: Recipe, strategy: Strategy,
                        token_ids, batch_size: int = 4, search_batches: int = 1,
                        progress: bool = True) -> dict:
    """Quantize `model` in place, block by block. Returns a report: per-site migration info and channel ranges.
    token_ids: [n, T] ids, or a dict with input_ids and attention_mask (padded samples: padding tokens are left
    out of the channel ranges, the strategy's error and the activation observers)."""
    device = next(model.parameters()).device
    batches, masks = calibration_batches(token_ids, batch_size, device)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    block_names = arch.blocks(model)
    if not block_names:
        raise PluginError(f"architecture {arch.name} found no blocks in the model")
    if recipe.bmm_inputs:
        attn = arch.attention_modules(model)
        if not attn:
            raise PluginError(f"recipe field 'bmm_inputs': architecture {arch.name} does not support BMM-input "
                              "quantization")
        install_bmm_quantization(model, attn, recipe.activations)
        for m in model.modules():
            if isinstance(m, ActQuantizer):
                m.mode = "off"   # switched on block by block, once the block is quantized

    report = {"architecture": arch.name, "strategy": strategy.name, "recipe": recipe.to_dict(), "sites": [],
              "clipping": [], "gptq": []}
    t0 = time.time()
    calls = capture_block_inputs(model, model.get_submodule(block_names[0]), batches)
    for c in calls:
        _check_finite(_hidden(c), "the embeddings")
    bar = tqdm(block_names, desc=f"calibrating ({strategy.name}, {recipe.name})", disable=not progress)
    for index, block_name in enumerate(bar):
        block = model.get_submodule(block_name)
        wrap_linears(block)
        sites = [s for s in arch.sites(model, index) if any(not recipe.keeps_fp(c) for c in s.consumers)]
        site_inputs, site_calls = _collect_site_inputs(model, block, sites, calls, search_batches)
        for site in sites:
            xs = site_inputs.pop(site.name)
            if not xs:
                raise PluginError(f"architecture {arch.name}: site {site.name} of {block_name} saw no input; "
                                  f"is {site.consumers[0]} inside the block?")
            for x in xs:
                _check_finite(x, f"the input of {site.consumers[0]}")
            n_search = min(search_batches, len(xs))
            data = SiteData(model=model, site=site, weight_spec=recipe.weights, act_spec=recipe.activations,
                            inputs=xs, search_inputs=xs[:n_search], token_masks=masks,
                            calls=site_calls[site.name][:n_search] or [None] * n_search,
                            quantized=[not recipe.keeps_fp(c) for c in site.consumers],
                            scale_search_min=arch.scale_search_min, smoothquant_alpha=arch.smoothquant_alpha,
                            shift_foldable=site.producer_kind == "layernorm" and
                            getattr(model.get_submodule(site.producer), "bias", None) is not None)
            lo, hi = data.channel_min(), data.channel_max()
            migration = strategy.migrate(data)
            entry = {"block": index, "site": site.name, "consumers": site.consumers,
                     "range_before": (lo.cpu(), hi.cpu())}
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
                    calls = [_with_hidden(c, (_hidden(c) - z.to(_hidden(c).dtype)) / s.to(_hidden(c).dtype))
                             for c in calls]
            else:
                entry["range_after"] = entry["range_before"]
            report["sites"].append(entry)
            del data, xs
        rounded = {}
        if recipe.weights.rounding == "gptq":
            rounded, entries = gptq_block(block, block_name, recipe, calls, masks)
            report["gptq"] += entries
        quantize_block(block, block_name, recipe, rounded)
        if any(isinstance(m, ActQuantizer) and not m.spec.dynamic for m in block.modules()):
            set_observing(block, True)
            for c, m in zip(calls, masks):
                set_token_mask(block, m)
                _run_block(block, c)
            set_token_mask(block, None)
        set_observing(block, False)
        report["clipping"] += search_clipping(block, block_name, sites, calls, masks)
        new_calls = []
        for c in calls:
            h = _run_block(block, c)
            _check_finite(h, f"the output of quantized block {block_name}")
            new_calls.append(_with_hidden(c, h))
        calls = new_calls
    report["calibration_seconds"] = time.time() - t0
    return report
