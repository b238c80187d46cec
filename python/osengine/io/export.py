"""Export a quantized model for other runtimes: the compressed-tensors format, which transformers loads with the
`compressed-tensors` package and vLLM serves. Three schemes, chosen by the model's quantization:

    W8A8    int8 weights (per channel or tensor) x int8 activations (static per tensor or dynamic per token);
            format "int-quantized"
    W4A8    int4 weights (per channel or per group) x int8 dynamic per-token activations; format "pack-quantized"
    W4A16 / W8A16   weights only (`weights_only=True`, `osengine export --weights-only`): the int4 or int8 weights
            (per channel or per group), activations left in floating point; format "pack-quantized"

What is written (a Hugging Face folder):

    config.json             the model's config + quantization_config (quant_method "compressed-tensors", the
                            format, status "compressed", one config group targeting Linear, ignore)
    model.safetensors       every weight; for each quantized linear L:
                              L.weight             int8 codes [out, in] (int-quantized; symmetric, in [-127, 127])
                              L.weight_packed      int32 [out, ceil(in * bits / 32)] (pack-quantized: code + 2^(b-1)
                                                   as a b-bit unsigned field, element i of a row at bit i * b)
                              L.weight_shape       int64 [2] = [out, in] (pack-quantized)
                              L.weight_scale       [out, 1] (per channel), [out, in / group] (per group) or [1]
                                                   (per tensor), the model's dtype
                              L.input_scale        [1], static activations only (symmetric ones are exact
                                                   with activations.full_range: true, int8 runtimes' -128 clamp)
                              L.input_zero_point   [1] int8, static asymmetric activations only
    generation_config.json, tokenizer files   when the model has them

The OS+ shift and scale are already folded into norms, biases and weights (an exactly equivalent model), so a
quantized model is a plain Hugging Face model plus quantization parameters. What the format cannot express is
refused with an ExportError naming the reason: a runtime shift (x - z before quantization, osplus shift=runtime),
activations other than 8 bits, weights other than 8 or 4 bits, asymmetric weights, int4 weights with static
activations, per-group int8 weights with quantized activations, per-group or dynamic per-tensor activations,
quantized BMM inputs, and the residual restore of post-LN encoders (BERT).

Tensor parallelism: vLLM splits a row-parallel linear's input dimension across GPUs, and each shard must hold whole
weight groups (and whole int32 words when packed). The summary's `tensor_parallel_sizes` lists the sizes among
1, 2, 4, 8 for which every quantized linear's input dimension splits so (checked on every linear, which is
conservative: column-parallel ones are split along their outputs) and the attention heads divide evenly.

Architecture facts come from the model's architecture plugin. When a quantized model has a bias that its config does
not give it (for instance a fine-tuned LLaMA with q/k/v biases), the export sets the plugin's `bias_flags` that make
room for it (LLaMA: `attention_bias` / `mlp_bias`) and writes zero biases for the projections of that group that have
none. Linears that read one input (the consumers of a migration site: q/k/v, gate/up), which vLLM runs as one GEMM,
get one input scale: they read the same tensor, so their calibrated ranges are identical; if they are not, the union
range is written (and a warning says so).

Writing is atomic: a temporary sibling folder renamed into place, so a refused or failed export leaves nothing at
the output path.
"""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from ..plugins.api import PluginError
from ..plugins.registry import resolve_architecture
from ..quant.layers import (
    EngineConversionError,
    FakeQuantLinear,
    ResidualRestore,
    RMSNorm,
    static_act_qparams_from_fake_quant,
    weight_codes_from_fake_quant,
)
from ..quant.recipes import recipe_from_dict
from .checkpoint import refuse_existing_output, write_folder_atomically
from .quantized_model import load_quantized, load_quantized_manifest

FORMATS = ("compressed-tensors",)
WEIGHTS_FILE = "model.safetensors"
# Projections that vLLM fuses into one GEMM (they share their input); each group needs one input scale.
# Config flags of LLaMA-family models that give a whole group of projections a bias.


class ExportError(ValueError):
    """The model (or its recipe) cannot be written in the requested format; the message says why."""


# ---------------------------------------------------------------------------------------------------------------
# Which quantization the format can express


def _spec_problem(spec_w, spec_a, shifted: bool, weights_only: bool = False) -> Optional[str]:
    """Why a linear quantized with these specs cannot be exported as compressed-tensors (None if it can)."""
    if shifted:
        return ("it applies an OS+ shift at run time (x - z before quantization, osplus shift=runtime); "
                "compressed-tensors has no per-channel input shift. Quantize with the shift folded or off "
                "(osplus shift=auto, the default, or shift=none on RMSNorm models)")
    if spec_w.bits not in (4, 8):
        return (f"its weights are int{spec_w.bits}; the compressed-tensors export writes int8 or int4 weights "
                "(W8A8, W4A8, W4A16, W8A16)")
    if not spec_w.symmetric:
        return ("its weights are asymmetric; vLLM's integer kernels take symmetric weights only "
                "(use a recipe with weights.symmetric: true)")
    if weights_only:
        if spec_w.granularity not in ("per-channel", "per-group"):
            return (f"its weights are quantized {spec_w.granularity}; W{spec_w.bits}A16 takes per-channel or "
                    "per-group weights")
        return None
    if spec_a.bits != 8:
        return (f"its activations are int{spec_a.bits}; the compressed-tensors export writes int8 activations "
                f"(W8A8, W4A8) or none (--weights-only: W4A16, W8A16); int{spec_a.bits} activations have no "
                "integer kernel in vLLM")
    if spec_w.bits == 4:
        if spec_w.granularity not in ("per-channel", "per-group"):
            return f"its weights are int4 {spec_w.granularity}; W4A8 takes per-channel or per-group int4 weights"
        if not (spec_a.dynamic and spec_a.granularity == "per-token"):
            return ("its int4 weights meet static or non-per-token int8 activations; vLLM's W4A8 integer kernels "
                    "take dynamic per-token activations (use w4a8 / w4a8-group, or export --weights-only for "
                    "W4A16)")
        return None
    if spec_w.granularity not in ("per-channel", "per-tensor"):
        return f"its weights are quantized {spec_w.granularity}; W8A8 int8 takes per-channel or per-tensor weights"
    if spec_a.granularity == "per-tensor" and spec_a.dynamic:
        return "its activations are dynamic per-tensor; W8A8 int8 takes static per-tensor or dynamic per-token"
    if spec_a.granularity not in ("per-tensor", "per-token"):
        return (f"its activations are quantized {spec_a.granularity}; W8A8 int8 takes static per-tensor or "
                f"dynamic per-token activations")
    return None


def scheme_name(spec_w, spec_a, weights_only: bool = False) -> str:
    """W8A8, W4A8, W4A16 or W8A16: the compressed-tensors scheme of an exportable linear."""
    return f"W{spec_w.bits}A16" if weights_only else f"W{spec_w.bits}A{spec_a.bits}"


def _packed(spec_w, weights_only: bool) -> bool:
    """pack-quantized (int32 words) for int4 weights and for every weight-only scheme, as vLLM's kernels read them."""
    return weights_only or spec_w.bits < 8


def check_recipe(recipe, weights_only: bool = False) -> None:
    """Refuse, before any model is loaded, a recipe that compressed-tensors cannot express."""
    if recipe.bmm_inputs:
        raise ExportError(f"recipe {recipe.name!r} quantizes the attention BMM inputs (Q, K, V, softmax "
                          f"probabilities); the compressed-tensors export does not express that. Use a recipe "
                          f"with bmm_inputs: false")
    problem = _spec_problem(recipe.weights, recipe.activations, shifted=False, weights_only=weights_only)
    if recipe.activation_overrides and not weights_only:
        problem = (f"it quantizes the inputs of {[name for name, _ in recipe.activation_overrides]} otherwise than "
                   "the other linears (activation_overrides); the export writes one activation scheme")
    if problem:
        raise ExportError(f"recipe {recipe.name!r} cannot be exported as compressed-tensors: {problem}")


def _quant_args(spec, *, weights: bool) -> dict:
    group_size = None
    if weights:
        strategy = {"per-channel": "channel", "per-group": "group", "per-tensor": "tensor"}[spec.granularity]
        group_size = spec.group_size if spec.granularity == "per-group" else None
    else:
        strategy = "token" if spec.dynamic else "tensor"
    return {"num_bits": spec.bits, "type": "int", "symmetric": bool(spec.symmetric), "strategy": strategy,
            "group_size": group_size, "dynamic": bool(spec.dynamic), "actorder": None,
            "observer": None if spec.dynamic else "minmax", "observer_kwargs": {}}


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed `bits`-bit codes [rows, cols] (int8) as compressed-tensors' pack-quantized words: each code + 2^(b-1)
    as an unsigned b-bit field, element i of a row at bits [i * b, (i + 1) * b) of the row's little-endian int32
    words (the last word zero-padded): [rows, ceil(cols * b / 32)] int32."""
    if 32 % bits:
        raise ValueError(f"pack_int32 packs widths that divide 32, not {bits}")
    per_word = 32 // bits
    unsigned = codes.to(torch.int64) + (1 << (bits - 1))
    rows, cols = unsigned.shape
    unsigned = torch.nn.functional.pad(unsigned, (0, (-cols) % per_word)).reshape(rows, -1, per_word)
    words = (unsigned << (torch.arange(per_word, dtype=torch.int64) * bits)).sum(-1)   # < 2^32: no field overlaps
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def tensor_parallel_sizes(quantized: dict, spec_w, packed: bool, config) -> list:
    """The tensor-parallel sizes among 1, 2, 4, 8 whose input shards hold whole weight groups (and whole int32
    words when packed) for every quantized linear, and that divide the attention heads."""
    unit = spec_w.group_size if spec_w.granularity == "per-group" else 1
    if packed:
        unit = unit * (32 // spec_w.bits) // math.gcd(unit, 32 // spec_w.bits)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    return [tp for tp in (1, 2, 4, 8)
            if all(m.in_features % (tp * unit) == 0 for m in quantized.values())
            and (heads is None or heads % tp == 0)]


# ---------------------------------------------------------------------------------------------------------------
# The model walk


def _quantized_linears(model: nn.Module):
    quantized, floating = {}, []
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLinear):
            if m.weight_spec is not None and m.act_quant is not None:
                quantized[name] = m
            else:
                floating.append(name)
        elif isinstance(m, nn.Linear):
            floating.append(name)
    return quantized, floating


def _check_model(model: nn.Module, quantized: dict, weights_only: bool = False) -> tuple:
    """The common (weight spec, activation spec) of the quantized linears (activation spec None when weights_only);
    ExportError for what cannot be written."""
    if not quantized:
        raise ExportError("the model has no quantized linear layers; quantize it first (osengine quantize)")
    if any(isinstance(m, ResidualRestore) for m in model.modules()):
        raise ExportError("the model restores its residual stream (X' * s + z, post-LN encoders such as BERT); "
                          "compressed-tensors cannot express that. The export supports decoder LMs "
                          "(LLaMA / Mistral / Qwen2, OPT, BLOOM)")
    rotated = [n for n, m in model.named_modules() if getattr(m, "input_rotation", None)]
    if rotated:
        raise ExportError(ONLINE_ROTATION_PROBLEM.format(rotated[0]))
    if any(isinstance(m, RMSNorm) for m in model.modules()):
        raise ExportError(RMS_NORM_PROBLEM)
    if any(hasattr(m, "osengine_bmm") for m in model.modules()):
        raise ExportError("the model quantizes the attention BMM inputs (recipe bmm_inputs: true); the "
                          "compressed-tensors export does not express that. Use a recipe with bmm_inputs: false")
    if not type(model).__name__.endswith("ForCausalLM"):
        raise ExportError(f"{type(model).__name__} is not a causal LM; the compressed-tensors export supports "
                          f"decoder LMs (LLaMA / Mistral / Qwen2, OPT, BLOOM)")
    specs = {}
    for name, m in quantized.items():
        problem = _spec_problem(m.weight_spec, m.act_quant.spec, m.input_shift is not None, weights_only)
        if problem:
            raise ExportError(f"{name} cannot be exported as compressed-tensors: {problem}")
        specs.setdefault((m.weight_spec, None if weights_only else m.act_quant.spec), []).append(name)
    if len(specs) > 1:
        raise ExportError("the quantized linears use different quantization settings "
                          f"({len(specs)} kinds); the export writes one scheme for all of them")
    return next(iter(specs))


ONLINE_ROTATION_PROBLEM = (
    "{} rotates its input at run time (an online Hadamard transform: strategy rotate); the compressed-tensors "
    "export writes plain quantized linears, which cannot express it. Quantize with the rotate option online=none "
    "(the offline rotation is folded into the weights and exports as is), or without rotate")
RMS_NORM_PROBLEM = (
    "the model's LayerNorms became RMSNorms when its residual stream was rotated (strategy rotate on a LayerNorm "
    "model); its Hugging Face architecture cannot express that, so neither can the export")


def _architecture(model: nn.Module):
    try:
        return resolve_architecture(model)
    except PluginError as e:
        raise ExportError(f"the export reads which linears are fused and which config flags add biases from the "
                          f"model's architecture plugin: {e}") from None


def _fused_groups(model: nn.Module, arch) -> list:
    """Lists of linears that vLLM fuses into one GEMM (they read one input: q/k/v, gate/up), by module name."""
    return arch.shared_input_groups(model)


def _check_fused_all_or_none(quantized: dict, groups: list) -> None:
    for group in groups:
        q = [n for n in group if n in quantized]
        if q and len(q) != len(group):
            fp = [n for n in group if n not in quantized]
            raise ExportError(f"fused projections {', '.join(group)} are partly kept in floating point "
                              f"({', '.join(fp)}); vLLM runs them as one GEMM, so all of them must be quantized or "
                              f"all kept in floating point (adjust keep_fp)")


def _static_input_params(quantized: dict, groups: list) -> tuple:
    """name -> (scale [1], signed zero point [1]) with one range per fused group; and the groups whose calibrated
    ranges differed (unified to their union)."""
    params = {n: static_act_qparams_from_fake_quant(n, m) for n, m in quantized.items()}
    unified = []
    for group in [g for g in groups if all(n in quantized for n in g)]:
        los = torch.stack([quantized[n].act_quant.lo.float() for n in group])
        his = torch.stack([quantized[n].act_quant.hi.float() for n in group])
        if bool((los == los[0]).all()) and bool((his == his[0]).all()):
            continue
        # Not expected (the members read the same tensor): write the union range for all of them.
        shared = static_act_qparams_from_fake_quant(group[0], quantized[group[0]], value_range=(los.min(), his.max()))
        for n in group:
            params[n] = tuple(t.clone() for t in shared)
        unified.append(group)
        warnings.warn(f"compressed-tensors export: fused projections {', '.join(group)} had different calibrated "
                      f"input ranges; their union [{los.min().item():.4g}, {his.max().item():.4g}] is written for all "
                      f"of them (vLLM needs one input scale per fused GEMM)", stacklevel=3)
    return params, unified


def _dedup_state_dict(model: nn.Module) -> dict:
    """model.state_dict() without the second name of tied parameters (e.g. lm_head.weight tied to the embeddings)."""
    sd = model.state_dict()
    kept = {name for name, _ in model.named_parameters()}
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in sd.items() if k not in every - kept}


def _expected_keys(model_class, config) -> dict:
    """name -> shape of what `model_class` built from `config` loads (tied duplicates left out), on the meta device."""
    with torch.device("meta"):
        ref = model_class(config)
    return {k: tuple(v.shape) for k, v in _dedup_state_dict(ref).items()}


def _set_dtype(config, dtype: torch.dtype) -> None:
    if "torch_dtype" in vars(config):  # transformers < 4.56
        config.torch_dtype = dtype
    else:
        config.dtype = dtype


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _write_atomically(out: Path, overwrite: bool, write) -> Path:
    """Run write(staging_folder) into a temporary sibling of `out`, then rename it into place."""
    refuse_existing_output(out, overwrite, ExportError)
    return write_folder_atomically(out, write, "exporting")


def _plain_tensors(model: nn.Module, quantized: dict) -> dict:
    """Every tensor but the quantizer state (act_quant.lo/hi, input_shift) of the quantized linears."""
    tensors = {}
    for key, value in _dedup_state_dict(model).items():
        owner, _, leaf = key.rpartition(".")
        if owner in quantized and leaf in ("weight", "bias") or not any(owner == n or owner.startswith(n + ".")
                                                                         for n in quantized):
            tensors[key] = value
    return tensors


def _config_for(model: nn.Module, tensors: dict, bias_flags: tuple) -> tuple:
    """(config, bias flags set, zero biases added): the model's config, with the architecture's bias flags set where
    a linear has a bias the config does not give it (a fold added one); the other linears of that group get zero
    biases in `tensors`."""
    config = copy.deepcopy(model.config)
    model_class = type(model)
    expected = _expected_keys(model_class, config)
    extra = [k for k in tensors if k not in expected]
    flags = []
    for flag in bias_flags:
        if extra and getattr(config, flag, None) is False:
            trial = copy.deepcopy(config)
            setattr(trial, flag, True)
            trial_expected = _expected_keys(model_class, trial)
            if any(k in trial_expected for k in extra):
                config, expected = trial, trial_expected
                flags.append(flag)
                extra = [k for k in extra if k not in expected]
    if extra:
        raise ExportError(f"{model_class.__name__} built from its config has no place for "
                          f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}; it cannot be exported as is")
    missing = [k for k in expected if k not in tensors]
    zero_biases = [k for k in missing if k.endswith(".bias")]
    if len(zero_biases) != len(missing):
        other = [k for k in missing if not k.endswith(".bias")]
        raise ExportError(f"the model lacks weights that {model_class.__name__} expects: {', '.join(other[:5])}")
    dtype = next(model.parameters()).dtype
    for k in zero_biases:
        tensors[k] = torch.zeros(expected[k], dtype=dtype)
    return config, flags, zero_biases


def _quantized_tensors(quantized: dict, inputs: dict, w_spec, a_spec, packed: bool) -> dict:
    """Each quantized linear's weight codes (int8, or packed int32 words with the weight's shape) and weight scales,
    and its input scale (and zero point) when its activations are static."""
    tensors = {}
    for name, m in quantized.items():
        codes, w_scale, _ = weight_codes_from_fake_quant(m)
        if packed:
            tensors[f"{name}.weight_packed"] = pack_int32(codes, w_spec.bits)
            tensors[f"{name}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
        else:
            tensors[f"{name}.weight"] = codes
        scale_shape = {"per-channel": (-1, 1), "per-group": (codes.shape[0], -1), "per-tensor": (1,)}
        tensors[f"{name}.weight_scale"] = w_scale.reshape(scale_shape[w_spec.granularity]).to(m.weight.dtype)
        if a_spec is not None and not a_spec.dynamic:
            scale, zero_point = inputs[name]
            tensors[f"{name}.input_scale"] = scale.reshape(1).to(m.weight.dtype)
            if not a_spec.symmetric:
                tensors[f"{name}.input_zero_point"] = zero_point.reshape(1).to(torch.int8)
    return tensors


def export_compressed_tensors(model: nn.Module, tokenizer, out_dir: Union[str, Path], *,
                              overwrite: bool = False, weights_only: bool = False) -> dict:
    """Write a quantized (fake-quant) model as a compressed-tensors folder (W8A8, W4A8; with weights_only, W4A16 or
    W8A16: the activations stay in floating point) that `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`
    loads (with the compressed-tensors package) and vLLM serves. Returns a summary: out, scheme, format, quantized /
    ignored layer counts, tensor-parallel sizes, zero biases added, fused groups whose ranges were unified. Raises
    ExportError (nothing written) for what the format cannot express."""
    quantized, floating = _quantized_linears(model)
    w_spec, a_spec = _check_model(model, quantized, weights_only)
    arch = _architecture(model)
    groups = _fused_groups(model, arch)
    _check_fused_all_or_none(quantized, groups)
    static = a_spec is not None and not a_spec.dynamic
    if static and a_spec.symmetric and not a_spec.full_range:
        warnings.warn("the model's static symmetric activation codes stop at -127 (the paper's range), where "
                      "compressed-tensors and vLLM clamp at -128: inputs below the calibrated range quantize "
                      "differently there. Quantize with activations.full_range: true (the w8a8-static preset) for "
                      "identical results", stacklevel=2)
    try:
        inputs, unified = _static_input_params(quantized, groups) if static else ({}, [])
    except EngineConversionError as e:  # a static quantizer that was never calibrated
        raise ExportError(str(e)) from None

    packed = _packed(w_spec, weights_only)
    tensors = _plain_tensors(model, quantized)
    config, flags, zero_biases = _config_for(model, tensors, arch.bias_flags)
    if packed:   # the float weights give way to weight_packed + weight_shape
        for name in quantized:
            del tensors[f"{name}.weight"]
    tensors.update(_quantized_tensors(quantized, inputs, w_spec, a_spec, packed))
    model_class = type(model)
    dtype = next(model.parameters()).dtype

    ignore = sorted(floating)
    compression = "pack-quantized" if packed else "int-quantized"
    scheme = {"targets": ["Linear"], "weights": _quant_args(w_spec, weights=True),
              "input_activations": None if a_spec is None else _quant_args(a_spec, weights=False),
              "output_activations": None, "format": compression}
    config.quantization_config = {
        "quant_method": "compressed-tensors", "format": compression, "quantization_status": "compressed",
        "config_groups": {"group_0": scheme}, "ignore": ignore, "kv_cache_scheme": None,
        "global_compression_ratio": None}
    config.architectures = [model_class.__name__]
    _set_dtype(config, dtype)

    def write(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        config.save_pretrained(folder)
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            generation.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    out = _write_atomically(Path(out_dir), overwrite, write)
    return {"out": str(out), "format": "compressed-tensors", "scheme": scheme_name(w_spec, a_spec, weights_only),
            "compression": compression, "quantized_linears": len(quantized),
            "tensor_parallel_sizes": tensor_parallel_sizes(quantized, w_spec, packed, model.config),
            "ignored_linears": len(ignore), "weights": scheme["weights"], "input_activations":
            scheme["input_activations"], "bias_flags_set": flags, "zero_biases": len(zero_biases),
            "unified_fused_groups": unified}


def export(source: Union[str, Path], format: str = "compressed-tensors", out: Union[str, Path] = None, *,
           overwrite: bool = False, device: str = "cpu", weights_only: bool = False) -> dict:
    """Export a folder written by `osengine.quantize(..., out=DIR)` (`osengine quantize --out DIR`); weights_only:
    the weights alone (W4A16 / W8A16), activations in floating point."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r} (supported: {', '.join(FORMATS)})")
    if out is None:
        raise ExportError("export needs an output folder (--out)")
    try:
        manifest = load_quantized_manifest(source)
    except (OSError, ValueError) as e:
        raise ExportError(f"{str(source)!r} is not a folder written by osengine quantize --out ({e})") from None
    if manifest.get("recipe") is not None:  # refuse early, before the model is loaded
        check_recipe(recipe_from_dict(manifest["recipe"]), weights_only)
    if manifest.get("runtime_shifted_linears"):
        raise ExportError(f"{manifest['runtime_shifted_linears'][0]} cannot be exported as compressed-tensors: "
                          + _spec_problem(None, None, shifted=True))
    if manifest.get("rotated_linears"):
        raise ExportError(ONLINE_ROTATION_PROBLEM.format(next(iter(manifest["rotated_linears"]))))
    if manifest.get("rms_norms"):
        raise ExportError(RMS_NORM_PROBLEM)
    if manifest.get("residual_restores"):
        raise ExportError("the model restores its residual stream (X' * s + z, post-LN encoders such as BERT); "
                          "compressed-tensors cannot express that")
    if manifest.get("prefix"):
        raise ExportError(f"the model runs behind a full-precision KV prefix {manifest['prefix']} (its outlier "
                          "tokens); compressed-tensors and vLLM cannot carry one, and without it the static "
                          "activation ranges no longer fit: quantize without a prefix (prefix none) to export")
    refuse_existing_output(out, overwrite, ExportError)
    model, tokenizer, _ = load_quantized(source, device=device)
    return export_compressed_tensors(model, tokenizer, out, overwrite=overwrite, weights_only=weights_only)
