"""Python API of the front end: osengine.quantize, osengine.evaluate, osengine.load_model, osengine.load,
osengine.find_outlier_tokens (and verify_engine / verify_native, behind `osengine check`)."""
from __future__ import annotations

import hashlib
import json
import resource
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .calibrate.data import CalibrationError, load_calibration
from .calibrate.distributed import reduction_from_environment
from .calibrate.pipeline import BLOCK_STEPS, calibrate_blockwise, given_activation_ranges
from .calibrate.prefix import OUTLIER_THRESHOLD, choose_prefix, run_after_prefix
from .engine import ops
from .evaluation import perplexity
from .io.checkpoint import refuse_existing_output
from .io.progress import (
    CalibrationProgress,
    ProgressError,
    progress_folder,
    remove_stale_staging,
    state_digest,
    tensor_digest,
)
from .io.quantized_model import (
    is_checkpoint,
    load_quantized,
    load_quantized_manifest,
    migration_tensors,
    save_quantized,
    structure_manifest,
)
from .io.sources import REGISTERED_MODELS, ModelLoadError, load_fp_model, resolve_source
from .io.streaming import StreamingError, load_streamed, parse_memory, save_streamed
from .plugins.api import PluginError
from .plugins.registry import make_strategy, resolve_architecture
from .quant.layers import set_integer_exact
from .quant.observers import checked_prefix
from .quant.recipes import Recipe, load_recipe
from .runtime.convert import convert_to_engine
from .runtime.simulate import simulate_folded_prologues


def load_model(source: Union[str, Path], device: str = "cpu"):
    """(model, tokenizer) from a Hugging Face folder, a GGUF file, a registered name (smollm2-135m, minilm-l6) or
    a folder written by `quantize(..., out=DIR)` (then the fake-quantized model; `load` gives the engine-backed one)."""
    if is_checkpoint(source):
        model, tokenizer, _ = load_quantized(source, device=device)
        return model, tokenizer
    return load_fp_model(source, device=device)


def load(directory: Union[str, Path], backend: str = "auto"):
    """(model, tokenizer): a folder written by `quantize(..., out=DIR)` rebuilt as an engine-backed model, whose
    quantized linears run with real int8 / int4 arithmetic (weights packed once), without re-calibrating. Layers the
    recipe keeps in floating point stay in floating point. backend: "auto", "avx2", "avx512_vnni", "reference" or
    "cuda"."""
    device = "cuda" if backend == "cuda" else "cpu"
    model, tokenizer, _ = load_quantized(directory, device=device)
    return convert_to_engine(model, backend=backend), tokenizer


def verify_engine(directory: Union[str, Path], prompt: str = "The history of the city begins",
                  new_tokens: int = 32, backend: str = "auto") -> dict:
    """Run a saved folder on the engine (as `load` builds it) and in the integer-exact simulation (the fake-quant
    model computing the engine's CPU arithmetic in torch: quant.layers.set_integer_exact,
    runtime.simulate.simulate_folded_prologues), greedy-decode `new_tokens` after `prompt` with both, and compare.
    They must agree bit for bit; a difference points at a kernel, a fusion or a plugin that computes something else
    than the simulation. Returns {"logits_identical", "logits_max_abs_diff", "positions", "tokens_identical",
    "first_token_difference", "new_tokens", "backend"}. CPU backends only ("auto" or a registered CPU backend)."""
    cpu_backends = ["auto"] + [name for name in ops.registered_backends() if name != "cuda"]
    if backend not in cpu_backends:
        raise ValueError(f"verify_engine: backend must be one of {cpu_backends} (the simulation follows the CPU "
                         f"kernels' rounding), got {backend!r}")
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"verify_engine: new_tokens must be a positive integer, got {new_tokens!r}")
    engine, tokenizer = load(directory, backend=backend)
    simulation, _ = load_model(directory)
    set_integer_exact(simulation)
    simulate_folded_prologues(simulation, engine)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError("verify_engine: the prompt gives no tokens")
    with torch.inference_mode():
        engine_tokens = _greedy_tokens(engine, ids, new_tokens)
        simulated_tokens = _greedy_tokens(simulation, ids, new_tokens)
        engine_logits = run_after_prefix(engine, simulated_tokens).logits     # both over the same sequence
        simulated_logits = run_after_prefix(simulation, simulated_tokens).logits
    differing = (engine_tokens != simulated_tokens).nonzero()
    return {"logits_identical": bool(torch.equal(engine_logits, simulated_logits)),
            "logits_max_abs_diff": float((engine_logits - simulated_logits).abs().max()),
            "positions": int(simulated_tokens.shape[1]),
            "tokens_identical": bool(torch.equal(engine_tokens, simulated_tokens)),
            "first_token_difference": None if len(differing) == 0 else int(differing[0, 1]) - ids.shape[1],
            "new_tokens": new_tokens, "backend": backend}


def _greedy_tokens(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """ids [1, n] followed by `new_tokens` greedy choices (the first maximum; the end-of-sequence token does not
    stop it), decoded with the KV cache behind the model's prefix, if it has one."""
    out = run_after_prefix(model, ids, use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(new_tokens - 1):
        out = run_after_prefix(model, torch.tensor([[tokens[-1]]]), past=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return torch.cat([ids, torch.tensor([tokens], dtype=ids.dtype)], dim=1)


def verify_native(directory: Union[str, Path], prompt: str = "The history of the city begins",
                  new_tokens: int = 64, n_threads: int = 0) -> dict:
    """Run a saved folder on the native runtime (C++, osengine.runtime.native) and in the integer-exact simulation
    (as verify_engine builds it): greedy-decode up to `new_tokens` after `prompt` (tokenized by the folder's
    tokenizer.json) on the runtime (it stops after the end-of-sequence token), and check that at every step the
    simulation, given the same prefix, chooses the same token (one teacher-forced pass over the prompt and the
    runtime's tokens: identical choices at every step are what the simulation's own greedy decode produces). The
    logits of both over that sequence are compared per position: max|runtime - simulation| / max|simulation|. The
    simulation computes RoPE and attention with the runtime's kernels (runtime.attention), so every activation code
    is the runtime's; the final norm and an fp32 lm_head sum in another float order than torch (~1e-6 apart), so
    the logits are not compared bit for bit; a greedy token could flip only where the two best logits are that
    close, which the gaps tell. Returns {"tokens_identical", "runtime_tokens",
    "simulation_tokens" (the runtime's up to the first difference, then the simulation's choice there),
    "first_token_difference" (index of the first differing new token, None), "logits_max_rel_diff",
    "logits_median_rel_diff", "logits_first_above_1e-3" (the first position whose difference exceeds 1e-3, None),
    "logits_finite", "positions", "prompt_tokens", "new_tokens", "text"} and, where the tokens differ,
    "runtime_token", "simulation_token", "simulation_gap" (the simulation's logit of its token minus that of the
    runtime's token at that position) and "runtime_gap" (the reverse, on the runtime)."""
    import numpy as np

    from .runtime.native import load_native

    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"verify_native: new_tokens must be a positive integer, got {new_tokens!r}")
    native = load_native(directory)
    ids = native.tokenizer.encode(prompt)
    if not ids:
        raise ValueError("verify_native: the prompt gives no tokens")
    engine, _ = load(directory)
    simulation, _ = load_model(directory)
    set_integer_exact(simulation)
    simulate_folded_prologues(simulation, engine)
    del engine
    runtime_tokens = list(native.context(n_ctx=len(ids) + new_tokens, n_threads=n_threads).generate(ids, new_tokens))
    # The simulation's greedy choices, read from one forward pass over the prompt and the runtime's tokens (teacher
    # forcing): while the two agree, each step's choice is what the simulation's own greedy decode would make (the
    # first maximum, as the runtime's sampler takes it), at the cost of one pass instead of a slow step per token.
    sequence = ids + runtime_tokens[:-1]
    with torch.inference_mode():
        want = run_after_prefix(simulation, torch.tensor([sequence])).logits[0].float().numpy()
    got = native.context(n_ctx=len(sequence), n_threads=n_threads).decode(sequence, all_logits=True)
    choices = want[len(ids) - 1:].argmax(axis=1).tolist()     # the simulation's choice for each new token
    first = next((i for i, (a, b) in enumerate(zip(runtime_tokens, choices)) if a != b), None)
    simulation_tokens = runtime_tokens if first is None else runtime_tokens[:first] + [choices[first]]
    finite = bool(np.isfinite(got).all())
    per_position = np.abs(got.astype(np.float64) - want).max(axis=1) / np.abs(want).max(axis=1)
    large = np.flatnonzero(per_position > 1e-3)
    result = {"tokens_identical": first is None, "runtime_tokens": runtime_tokens,
              "simulation_tokens": simulation_tokens, "first_token_difference": first,
              "logits_max_rel_diff": float(per_position.max()),
              "logits_median_rel_diff": float(np.median(per_position)),
              "logits_first_above_1e-3": int(large[0]) if len(large) else None,
              "logits_finite": finite, "positions": len(sequence), "prompt_tokens": len(ids),
              "new_tokens": new_tokens, "text": native.tokenizer.decode(runtime_tokens, skip_special_tokens=True)}
    if first is not None:
        row = len(ids) + first - 1     # the position whose logits chose new token `first` (the same prefix on both)
        r, s = runtime_tokens[first], choices[first]
        result.update(runtime_token=r, simulation_token=s, simulation_gap=float(want[row, s] - want[row, r]),
                      runtime_gap=float(got[row, r] - got[row, s]))
    return result


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def quantize(model: Union[nn.Module, str, Path], recipe: Union[str, Path, dict, Recipe] = "w8a8-static",
             strategy: str = "osplus", calibration="generated", *, tokenizer=None, keep_fp: Sequence[str] = (),
             strategy_options: Optional[dict] = None, weight_rounding: Optional[str] = None, n_samples: int = 16,
             seq_len: int = 512, batch_size: int = 4, search_batches: int = 1, device: Optional[str] = None,
             out: Optional[Union[str, Path]] = None, overwrite: bool = False, progress: bool = True,
             prefix: Union[str, Sequence[int], None] = None, activation_ranges: Optional[dict] = None,
             manifest_extra: Optional[dict] = None, resume: bool = False,
             max_memory: Union[str, int, None] = None) -> nn.Module:
    """Quantize a model (in place) with a recipe and a calibration strategy; returns the fake-quantized model.

    model          nn.Module (then give `tokenizer` for text calibration) or anything `load_model` accepts
    recipe         preset name, YAML path, dict or Recipe; `keep_fp` adds layers kept in floating point;
                   `weight_rounding` "gptq" replaces the recipe's weights.rounding (GPTQ instead of nearest)
    strategy       registered strategy name (osplus, smoothquant, minmax, or a plugin); options in strategy_options
    calibration    text file, "generated" (samples the model writes itself), list of strings (encoders: one padded
                   sample per string, special tokens included), token ids [n, T], or a dict of padded input_ids
                   and attention_mask
    search_batches calibration batches (of batch_size x seq_len tokens) on which OS+ scores its grid
    prefix         "auto": find the model's outlier tokens on the calibration data and keep the prefix that takes
                   their role in full precision in front of every sequence (calibrate/prefix.py; PrefixQuant);
                   a list of token ids: that prefix; "none": no prefix; None: the recipe's field `prefix` (where
                   "auto" means nothing for a model that is not a causal LM). The quantized model runs behind the
                   prefix's stored keys and values (model.osengine_prefix_kv; the folder stores them)
    activation_ranges  {block linear full name: (lo, hi)}: the static activation ranges to use instead of observing
                   them on the calibration data (e.g. learned by train_qat); the clipping search is then skipped
    out            folder for the checkpoint (model.safetensors, osengine.json, config and tokenizer; written
                   atomically; an existing folder is replaced only with overwrite=True). Reload it with
                   `load` (engine-backed) or `load_model` (fake quant). With `out`, the progress is saved after
                   every block in OUT.progress (osengine.io.progress) and removed once the folder is saved
    resume         continue the interrupted run that wrote OUT.progress from its last finished block (same
                   arguments; the result equals an uninterrupted run's); without progress to resume, start afresh.
                   Without resume, existing progress is an error (nothing is deleted)
    max_memory     e.g. "1.5GiB": calibrate a model larger than memory block by block from its safetensors files
                   (osengine.io.streaming; needs `out` and a model folder or name); fails early when the estimated
                   peak exceeds it. The returned model's blocks are then empty: reload the folder to run it
    The report (per-site migrations, channel ranges, timing, peak memory) is at `model.osengine_report`.
    """
    if out is not None:  # fail before calibrating, not after
        refuse_existing_output(out, overwrite)
    elif resume:
        raise ValueError("quantize(resume=True): resuming needs the output folder `out` (--out) whose progress "
                         "it continues")
    recipe = load_recipe(recipe, keep_fp=tuple(keep_fp), weight_rounding=weight_rounding)
    streamed = None
    if max_memory is not None:
        _check_streaming(model, out, resume, recipe, prefix, calibration, device)
        source = str(model)
        model, loaded_tokenizer, streamed = load_streamed(source, parse_memory(max_memory), n_samples, seq_len,
                                                          batch_size)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        model, tokenizer, source = _floating_point_model(model, tokenizer, device)
    try:
        return _calibrate_and_save(model, tokenizer, source, recipe, strategy, strategy_options, calibration,
                                   n_samples=n_samples, seq_len=seq_len, batch_size=batch_size,
                                   search_batches=search_batches, device=device, out=out, overwrite=overwrite,
                                   progress=progress, prefix=prefix, activation_ranges=activation_ranges,
                                   manifest_extra=manifest_extra, resume=resume, streamed=streamed)
    finally:
        if streamed is not None:
            streamed.cleanup()


def _check_streaming(model, out, resume, recipe, prefix, calibration, device) -> None:
    """What streaming (max_memory) needs, checked before anything is loaded."""
    if isinstance(model, nn.Module):
        raise StreamingError("max_memory streams a model from its safetensors files: give its folder or registered "
                             "name, not a module in memory")
    if out is None:
        raise StreamingError("max_memory writes the quantized model block by block: it needs the output folder `out` "
                             "(--out)")
    if resume:
        raise StreamingError("resume is not supported together with max_memory in this version")
    if recipe.bmm_inputs:
        raise StreamingError(f"recipe {recipe.name!r} quantizes the attention BMM inputs; max_memory does not stream "
                             "those in this version")
    effective_prefix = recipe.prefix if prefix is None else prefix
    if effective_prefix != "none" and list(effective_prefix) != []:
        raise StreamingError("a full-precision prefix is computed by the whole floating-point model; max_memory runs "
                             "without one (prefix none)")
    if isinstance(calibration, str) and calibration == "generated":
        raise StreamingError("calibration 'generated' needs the whole model to write its samples; give max_memory a "
                             "calibration text file")
    if device not in (None, "cpu"):
        raise StreamingError("max_memory streams on the CPU in this version (device cpu)")


def _calibrate_and_save(model, tokenizer, source, recipe, strategy, strategy_options, calibration, *, n_samples,
                        seq_len, batch_size, search_batches, device, out, overwrite, progress, prefix,
                        activation_ranges, manifest_extra, resume, streamed) -> nn.Module:
    """quantize() once the floating-point model is loaded (in memory, or streamed)."""
    strat = make_strategy(strategy, strategy_options)
    arch = resolve_architecture(model)
    recipe = _adapted_recipe(strat, recipe, model, arch)
    if tokenizer is None and not isinstance(calibration, (torch.Tensor, dict)):
        raise CalibrationError("quantize(): `tokenizer` is needed to turn the calibration text into tokens")
    reduction = reduction_from_environment(device or str(next(model.parameters()).device))
    if reduction is not None and resume:
        raise ValueError("quantize(resume=True) is not supported with several processes (torch.distributed) in "
                         "this version")
    if reduction is not None and streamed is not None:
        raise StreamingError("max_memory is not supported with several processes (torch.distributed) in this "
                             "version")
    progress = progress and (reduction is None or reduction.rank == 0)   # one progress bar for several processes
    checkpoints = None
    if out is not None and reduction is None and streamed is None:
        identity = {"model_state_sha256": state_digest(model), "recipe": recipe.to_dict(), "strategy": strat.name,
                    "strategy_options": _jsonable(strategy_options or {}),
                    "calibration": _calibration_identity(calibration), "n_samples": n_samples, "seq_len": seq_len,
                    "batch_size": batch_size, "search_batches": search_batches, "prefix": _jsonable(prefix),
                    "activation_ranges": None if activation_ranges is None else _ranges_digest(activation_ranges),
                    "blocks": arch.blocks(model)}
        checkpoints = CalibrationProgress(progress_folder(out), identity, recipe, arch)
        if resume:
            remove_stale_staging(out)
        if checkpoints.exists() and not resume:
            raise ProgressError(f"{str(checkpoints.folder)!r} holds the progress of an interrupted run writing "
                                f"{str(out)!r}; pass resume=True (--resume) to continue it, or delete that folder "
                                "to start over")
    t0 = time.time()
    if checkpoints is not None and checkpoints.exists():
        checkpoints.check_identity()
        ids = checkpoints.calibration_ids()
    else:
        ids = load_calibration(calibration, model, tokenizer, n_samples=n_samples, seq_len=seq_len,
                               progress=progress)
        if checkpoints is not None:
            checkpoints.start(ids)
    if reduction is not None:   # every process calibrates on rank 0's samples (generated text may differ)
        ids = _same_on_every_process(ids, reduction)
    t_data = time.time() - t0
    if prefix is None:
        prefix = recipe.prefix if _is_causal_lm(model) or recipe.prefix != "auto" else "none"
    prefix_ids, detection = _resolve_prefix(prefix, model, arch, ids, tokenizer, batch_size)
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = BLOCK_STEPS
    if activation_ranges is not None:
        steps = tuple(given_activation_ranges(activation_ranges) if s.name == "observe" else s
                      for s in BLOCK_STEPS if s.name != "clip")
    report = calibrate_blockwise(model, arch, recipe, strat, ids, batch_size=batch_size,
                                 search_batches=search_batches, progress=progress,
                                 prefix=prefix_ids, steps=steps, checkpoints=checkpoints, reduction=reduction,
                                 residency=streamed)
    report["processes"] = 1 if reduction is None else reduction.world_size
    if detection is not None:
        report["prefix_detection"] = [r.to_dict() for r in detection]
    n_tokens = int(ids["attention_mask"].sum()) if isinstance(ids, dict) else int(ids.numel())
    report.update(calibration_data_seconds=t_data, calibration_tokens=n_tokens,
                  strategy_options=dict(strategy_options or {}), peak_rss_mib=_peak_rss_mib())
    if next(model.parameters()).is_cuda:
        report["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    report["streamed"] = streamed is not None
    model.osengine_report = report
    if out is not None:
        manifest = _quantization_manifest(model, source, recipe, strat, strategy_options, arch, calibration, ids)
        manifest.update(manifest_extra or {})
        if streamed is not None:
            save_streamed(streamed, tokenizer, out, manifest, migration_tensors(report), overwrite=overwrite)
            report["peak_rss_mib"] = _peak_rss_mib()   # writing included
        elif reduction is None or reduction.rank == 0:   # every process holds the same model: rank 0 writes it
            save_quantized(model, tokenizer, out, manifest, overwrite=overwrite)
        if checkpoints is not None:
            checkpoints.remove()
        if reduction is not None:
            reduction.barrier()   # the folder is complete when any process returns
    return model


def _same_on_every_process(ids, reduction):
    """Rank 0's calibration ids (a tensor, or a dict of input_ids and attention_mask) on every process."""
    if isinstance(ids, dict):
        return {k: _same_on_every_process(v, reduction) for k, v in sorted(ids.items())}
    shape = reduction.broadcast(torch.tensor(list(ids.shape), dtype=torch.int64))
    local = ids if tuple(ids.shape) == tuple(shape.tolist()) else torch.zeros(shape.tolist(), dtype=ids.dtype)
    return reduction.broadcast(local)


def _jsonable(value):
    """A JSON-comparable form of an argument recorded in a run's identity."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


def _calibration_identity(calibration):
    """The calibration argument as a run's identity records it: text arguments as given, token ids by digest."""
    if isinstance(calibration, torch.Tensor):
        return {"token_ids_sha256": tensor_digest(calibration)}
    if isinstance(calibration, dict):
        return {f"{k}_sha256": tensor_digest(v) for k, v in sorted(calibration.items())}
    return _jsonable(calibration)


def _ranges_digest(ranges: dict) -> str:
    text = json.dumps({k: [float(v) for v in r] for k, r in sorted(ranges.items())})
    return hashlib.sha256(text.encode()).hexdigest()


def _floating_point_model(model, tokenizer, device: Optional[str]) -> tuple:
    """(model, tokenizer, source name or None): `model` itself (moved to `device` if given), or the floating-point
    model `load_fp_model` reads from a source name; a quantized folder is refused."""
    if isinstance(model, nn.Module):
        return (model if device is None else model.to(device)), tokenizer, None
    source = str(model)
    if is_checkpoint(source):
        raise ModelLoadError(f"model {source!r} is already quantized; give the floating-point model")
    model, tokenizer = load_fp_model(source, device=device or "cpu")
    return model, tokenizer, source


def _base_model_name(source: str) -> str:
    """How a saved folder names its floating-point source: a registered name as is, else the resolved path."""
    return source if source in REGISTERED_MODELS else str(resolve_source(source))


def qat_state_dir(out: Union[str, Path]) -> Path:
    """Where train_qat keeps its training state for the output folder `out` (beside it: out must not exist yet)."""
    out = Path(out)
    return out.parent / f"{out.name}.qat-state"


def train_qat(model: Union[nn.Module, str, Path], data, *, recipe: Union[str, Path, dict, Recipe] = "w4a4-token",
              out: Union[str, Path], tokenizer=None, steps: int = 300, batch_size: int = 4, seq_len: int = 256,
              lr: float = 1e-4, range_lr: float = 1e-3, kurtosis_weight: float = 1e-7, warmup_steps: int = 10,
              init_quantile: float = 0.999, save_every: int = 25, seed: int = 0, keep_fp: Sequence[str] = (),
              weight_rounding: Optional[str] = None, calibration_samples: int = 16, resume: bool = False,
              state_dir: Optional[Union[str, Path]] = None, stop_after: Optional[int] = None,
              strategy: Optional[str] = None, strategy_options: Optional[dict] = None, keep_state: bool = False,
              device: Optional[str] = None, overwrite: bool = False, progress: bool = True) -> nn.Module:
    """Quantization-aware training (train/qat.py: learned clipping ranges of static inputs, straight-through
    rounding, a kurtosis penalty on the linears' outputs), then post-training weight quantization (round to nearest,
    or GPTQ with weight_rounding="gptq") with the learned ranges as the static activation ranges; the result is
    saved to `out` like any quantized folder and returned (fake quant; `load(out)` runs it on the engine).

    data        a UTF-8 text file that training windows of seq_len tokens are cut from (every whole window), or
                token ids [n, seq_len]; the first calibration_samples windows also calibrate the weight quantization
    state_dir   training state, saved every save_every steps (default: beside out, OUT.qat-state); a state from an
                earlier run is continued with resume=True (it must be the same model, recipe, data and settings),
                refused otherwise; removed once the run has finished and out is written
    device      where to train and then quantize (cpu, cuda)
    stop_after  train only up to this step of the `steps`-step schedule, keep the state and write the model of that
                point to `out` (a learning curve: call again with resume=True and a later stop_after)
    strategy    a strategy that only transforms the model (Strategy.migrates false: "rotate", with its options in
                strategy_options) applied before training, so that training starts from the transformed, equivalent
                model and learns around its quantization (rotations and QAT compose; the online rotations are
                trained through); strategies that migrate sites from calibration statistics are refused
    keep_state  keep the training state when the schedule has finished (to quantize the trained model again, e.g.
                with other weight rounding: call again with resume=True)
    """
    import hashlib

    from .calibrate.data import read_text_file, text_samples
    from .train.qat import QATConfig, QATError, train

    refuse_existing_output(out, overwrite)
    model, tokenizer, source = _floating_point_model(model, tokenizer, device)
    config = QATConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, range_lr=range_lr,
                       kurtosis_weight=kurtosis_weight, warmup_steps=warmup_steps, init_quantile=init_quantile,
                       save_every=save_every, seed=seed)
    config.check()
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                   or not 1 <= stop_after <= steps):
        raise QATError(f"train_qat: stop_after must be an integer in [1, steps={steps}], got {stop_after!r}")
    if not _is_causal_lm(model):
        raise QATError("train_qat: QAT trains on the next-token loss; the model must be a causal language model")
    recipe = load_recipe(recipe, keep_fp=tuple(keep_fp), weight_rounding=weight_rounding)
    if recipe.bmm_inputs or (recipe.prefix != "none"):
        raise QATError(f"train_qat: recipe {recipe.name!r} quantizes attention inputs or uses a prefix, which QAT does "
                       "not train in this version; use a recipe with bmm_inputs: false and prefix: none")
    arch = resolve_architecture(model)
    if strategy is None and strategy_options:
        raise QATError(f"train_qat: strategy_options {strategy_options} given without a strategy")
    strat = None if strategy is None else make_strategy(strategy, strategy_options)
    if strat is not None and strat.migrates:
        raise QATError(f"train_qat: strategy {strat.name!r} migrates sites from calibration statistics, which "
                       "training would change; QAT composes with strategies that only transform the model (rotate)")
    if isinstance(data, torch.Tensor):
        windows = data
    else:
        if tokenizer is None:
            raise QATError("train_qat: `tokenizer` is needed to turn the training text into tokens")
        if not Path(str(data)).is_file():
            raise QATError(f"train_qat: training text file {str(data)!r} does not exist")
        text = read_text_file(Path(data), "train_qat: training text file", QATError)
        try:
            windows = text_samples(text, tokenizer, n_samples=2 ** 31 - 1, seq_len=seq_len)
        except CalibrationError as e:
            raise QATError(f"train_qat: training text file {str(data)!r}: {e}") from None
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.dtype not in (torch.int64, torch.int32):
        raise QATError(f"train_qat: training data must be integer token ids [n, seq_len >= 2], got "
                       f"{tuple(windows.shape)} {windows.dtype}")
    windows = windows.long()
    transforms, strategy_record = {}, None
    if strat is not None:   # once the inputs are checked: the model changes in place from here
        recipe = _adapted_recipe(strat, recipe, model, arch)
        transforms = strat.prepare(model, arch) or {}
        strategy_record = {"strategy": strat.name, "strategy_options": _jsonable(strategy_options or {})}
    run_id = {"model": source or type(model).__name__, "architecture": arch.name,
              "data_sha256": hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest(),
              **({"transform": strategy_record} if strategy_record else {})}
    state = Path(state_dir) if state_dir is not None else qat_state_dir(out)
    t0 = time.time()
    ranges, history = train(model, arch.blocks(model), recipe, windows, config, state, run_id, resume=resume,
                            progress=progress, stop_after=stop_after)
    training_seconds = time.time() - t0
    finished = len(history) >= steps
    training = {"method": "qat", "steps_done": len(history), "steps": steps, "finished": finished,
                "transform": strategy_record,
                "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
                "training_seconds_this_run": round(training_seconds, 1), "history": history}
    calibration = windows[:max(1, calibration_samples)].to(next(model.parameters()).device)
    extra = {"training": training}
    if transforms:   # the folder records the rotation as one quantized with the strategy does
        extra["model_transforms"] = transforms
    if source is not None:
        extra["base_model"] = _base_model_name(source)
    quantized = quantize(model, recipe=recipe, strategy="minmax", calibration=calibration, tokenizer=tokenizer,
                         batch_size=4, progress=progress, prefix="none", activation_ranges=ranges, out=out,
                         overwrite=overwrite, manifest_extra=extra)
    quantized.osengine_report["training"] = training
    quantized.osengine_report["model_transforms"] = transforms
    if finished and not keep_state:
        import shutil
        shutil.rmtree(state, ignore_errors=True)
    return quantized


def _adapted_recipe(strategy, recipe: Recipe, model, arch) -> Recipe:
    """The strategy's own version of the recipe (Strategy.adapt_recipe), checked to be a Recipe."""
    adapted = strategy.adapt_recipe(recipe, model, arch)
    if not isinstance(adapted, Recipe):
        raise PluginError(f"strategy {strategy.name}: adapt_recipe() must return a Recipe, got "
                          f"{type(adapted).__name__}")
    return adapted


def _is_causal_lm(model) -> bool:
    return hasattr(model, "can_generate") and model.can_generate()


def _resolve_prefix(prefix, model, arch, ids, tokenizer, batch_size) -> tuple:
    """(prefix token ids, the outlier measurements when they were detected) for quantize()'s `prefix`."""
    if isinstance(prefix, str) and prefix == "none":
        return [], None
    if not _is_causal_lm(model):
        raise ValueError("quantize(): a full-precision prefix is a fixed start of the KV cache, which only causal "
                         "language models have; use prefix='none' for this model")
    if isinstance(prefix, str):
        if prefix != "auto":
            raise ValueError(f"quantize(): prefix must be 'auto', 'none' or a list of token ids, got {prefix!r}")
        input_ids, mask = (ids["input_ids"], ids["attention_mask"]) if isinstance(ids, dict) else (ids, None)
        bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        chosen, reports = choose_prefix(model, arch, input_ids, mask, bos_token_id=bos, batch_size=batch_size)
        return chosen, reports
    return checked_prefix(prefix, getattr(model.config, "vocab_size", None), "quantize()"), None


def _quantization_manifest(model, source, recipe, strategy, strategy_options, arch, calibration, ids) -> dict:
    """What a saved folder records about how it was made (and what load_quantized must rebuild)."""
    base = "(in-memory module)" if source is None else _base_model_name(source)
    ids_only = ids["input_ids"] if isinstance(ids, dict) else ids
    return {"base_model": base, "recipe": recipe.to_dict(), "prefix": list(getattr(model, "osengine_prefix", [])),
            "strategy": strategy.name, "strategy_options": dict(strategy_options or {}),
            "architecture": arch.name, **structure_manifest(model),
            "model_transforms": getattr(model, "osengine_report", {}).get("model_transforms", {}),
            "calibration": {"source": str(calibration) if isinstance(calibration, (str, Path)) else
                            type(calibration).__name__, "samples": int(ids_only.shape[0]),
                            "seq_len": int(ids_only.shape[1])}}


def evaluate(model: Union[nn.Module, str, Path], ppl: Union[str, Path], *, tokenizer=None, seq_len: int = 512,
             windows: Optional[int] = 16, device: Optional[str] = None, engine: bool = False,
             progress: bool = True) -> dict:
    """Perplexity over `windows` non-overlapping windows of `seq_len` tokens of the text file `ppl` ("generated":
    text that the floating-point base model writes). engine=True runs a saved quantized folder on the engine
    (real int arithmetic, `load`) instead of fake quant."""
    generator = None
    if not isinstance(model, nn.Module):
        if engine and not is_checkpoint(model):
            raise ValueError(f"evaluate(engine=True): {str(model)!r} is not a quantized folder (quantize --out DIR)")
        if str(ppl) == "generated" and is_checkpoint(model):  # the FP base model writes the evaluation text
            base = load_quantized_manifest(model)["base_model"]
            if base == "(in-memory module)":
                raise ValueError(f"{str(model)!r} was quantized from an in-memory module, so its floating-point "
                                 f"base is unknown and cannot write the 'generated' text; give a text file")
            generator, _ = load_fp_model(base, device=device or "cpu")
        if engine:
            model, tokenizer = load(model, backend="cuda" if device == "cuda" else "auto")
        else:
            model, tokenizer = load_model(model, device=device or "cpu")
    elif tokenizer is None:
        raise ValueError("evaluate(): `tokenizer` is required when `model` is a module")
    return perplexity(model, tokenizer, ppl, seq_len=seq_len, windows=windows, progress=progress,
                      generator_model=generator)


def find_outlier_tokens(model: Union[nn.Module, str, Path], calibration="generated", *, tokenizer=None,
                        n_samples: int = 8, seq_len: int = 256, threshold: float = OUTLIER_THRESHOLD,
                        max_prefix: int = 4, batch_size: int = 4, device: Optional[str] = None,
                        progress: bool = True) -> dict:
    """The outlier tokens of a floating-point model on calibration data, and the full-precision prefix that takes
    their role (osengine.calibrate.prefix: per block and linear input, each token's max |x| over the median token's;
    above `threshold` a token is an outlier). Returns {"prefix": token ids, "prefix_tokens": their text,
    "reports": [OutlierReport without a prefix, then after each prefix token], "samples", "seq_len"}."""
    if not isinstance(model, nn.Module):
        if is_checkpoint(str(model)):
            raise ModelLoadError(f"model {str(model)!r} is already quantized; give the floating-point model")
        model, tokenizer = load_fp_model(str(model), device=device or "cpu")
    elif tokenizer is None and not isinstance(calibration, (torch.Tensor, dict)):
        raise CalibrationError("find_outlier_tokens(): `tokenizer` is needed to turn the calibration text into tokens")
    arch = resolve_architecture(model)
    ids = load_calibration(calibration, model, tokenizer, n_samples=n_samples, seq_len=seq_len, progress=progress)
    input_ids, mask = (ids["input_ids"], ids["attention_mask"]) if isinstance(ids, dict) else (ids, None)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    prefix, reports = choose_prefix(model, arch, input_ids, mask, bos_token_id=bos, threshold=threshold,
                                    max_length=max_prefix, batch_size=batch_size)
    text = [tokenizer.decode([i]) for i in prefix] if tokenizer is not None else [str(i) for i in prefix]
    return {"prefix": prefix, "prefix_tokens": text, "reports": reports, "samples": int(input_ids.shape[0]),
            "seq_len": int(input_ids.shape[1])}
