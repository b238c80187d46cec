"""Export a quantized model for other runtimes: the compressed-tensors format (W8A8 int8), which transformers loads
with the `compressed-tensors` package and vLLM serves.

What is written (a Hugging Face folder):

    config.json             the model's config + quantization_config (quant_method "compressed-tensors",
                            format "int-quantized", status "compressed", one config group targeting Linear, ignore)
    model.safetensors       every weight; for each quantized linear L:
                              L.weight             int8 codes [out, in] (symmetric, in [-127, 127])
                              L.weight_scale       [out, 1] (per channel) or [1] (per tensor), the model's dtype
                              L.input_scale        [1], static activations only (symmetric ones are exact
                                                   with activations.full_range: true, int8 runtimes' -128 clamp)
                              L.input_zero_point   [1] int8, static asymmetric activations only
    generation_config.json, tokenizer files   when the model has them

The OS+ shift and scale are already folded into norms, biases and weights (an exactly equivalent model), so a
quantized model is a plain Hugging Face model plus quantization parameters. What the format cannot express is
refused with an ExportError naming the reason: a runtime shift (x - z before quantization, osplus shift=runtime),
activations or weights other than 8 bits, asymmetric or per-group weights, per-group or dynamic per-tensor
activations, quantized BMM inputs, and the residual restore of post-LN encoders (BERT).

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


def _spec_problem(spec_w, spec_a, shifted: bool) -> Optional[str]:
    """Why a linear quantized with these specs cannot be exported as compressed-tensors W8A8 (None if it can)."""
    if shifted:
        return ("it applies an OS+ shift at run time (x - z before quantization, osplus shift=runtime); "
                "compressed-tensors has no per-channel input shift. Quantize with the shift folded or off "
                "(osplus shift=auto, the default, or shift=none on RMSNorm models)")
    if spec_a.bits != 8:
        return (f"its activations are int{spec_a.bits}; the compressed-tensors export writes W8A8 only "
                f"(int{spec_a.bits} activations have no int8 kernel in vLLM)")
    if spec_w.bits != 8:
        return f"its weights are int{spec_w.bits}; the compressed-tensors export writes W8A8 only"
    if not spec_w.symmetric:
        return ("its weights are asymmetric; W8A8 int8 kernels take symmetric weights only "
                "(use a recipe with weights.symmetric: true)")
    if spec_w.granularity not in ("per-channel", "per-tensor"):
        return f"its weights are quantized {spec_w.granularity}; W8A8 int8 takes per-channel or per-tensor weights"
    if spec_a.granularity == "per-tensor" and spec_a.dynamic:
        return "its activations are dynamic per-tensor; W8A8 int8 takes static per-tensor or dynamic per-token"
    if spec_a.granularity not in ("per-tensor", "per-token"):
        return (f"its activations are quantized {spec_a.granularity}; W8A8 int8 takes static per-tensor or "
                f"dynamic per-token activations")
    return None


def check_recipe(recipe) -> None:
    """Refuse, before any model is loaded, a recipe that compressed-tensors W8A8 cannot express."""
    if recipe.bmm_inputs:
        raise ExportError(f"recipe {recipe.name!r} quantizes the attention BMM inputs (Q, K, V, softmax "
                          f"probabilities); the compressed-tensors export does not express that. Use a recipe "
                          f"with bmm_inputs: false")
    problem = _spec_problem(recipe.weights, recipe.activations, shifted=False)
    if recipe.activation_overrides:
        problem = (f"it quantizes the inputs of {[name for name, _ in recipe.activation_overrides]} otherwise than "
                   "the other linears (activation_overrides); the export writes one activation scheme")
    if problem:
        raise ExportError(f"recipe {recipe.name!r} cannot be exported as compressed-tensors: {problem}")


def _quant_args(spec, *, weights: bool) -> dict:
    if weights:
        strategy = "channel" if spec.granularity == "per-channel" else "tensor"
    else:
        strategy = "token" if spec.dynamic else "tensor"
    return {"num_bits": spec.bits, "type": "int", "symmetric": bool(spec.symmetric), "strategy": strategy,
            "group_size": None, "dynamic": bool(spec.dynamic), "actorder": None,
            "observer": None if spec.dynamic else "minmax", "observer_kwargs": {}}


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


def _check_model(model: nn.Module, quantized: dict) -> tuple:
    """The common (weight spec, activation spec) of the quantized linears; ExportError for what cannot be written."""
    if not quantized:
        raise ExportError("the model has no quantized linear layers; quantize it first (osengine quantize)")
    if any(isinstance(m, ResidualRestore) for m in model.modules()):
        raise ExportError("the model restores its residual stream (X' * s + z, post-LN encoders such as BERT); "
                          "compressed-tensors cannot express that. The export supports decoder LMs "
                          "(LLaMA / Mistral / Qwen2, OPT, BLOOM)")
    if any(hasattr(m, "osengine_bmm") for m in model.modules()):
        raise ExportError("the model quantizes the attention BMM inputs (recipe bmm_inputs: true); the "
                          "compressed-tensors export does not express that. Use a recipe with bmm_inputs: false")
    if not type(model).__name__.endswith("ForCausalLM"):
        raise ExportError(f"{type(model).__name__} is not a causal LM; the compressed-tensors export supports "
                          f"decoder LMs (LLaMA / Mistral / Qwen2, OPT, BLOOM)")
    specs = {}
    for name, m in quantized.items():
        problem = _spec_problem(m.weight_spec, m.act_quant.spec, m.input_shift is not None)
        if problem:
            raise ExportError(f"{name} cannot be exported as compressed-tensors: {problem}")
        specs.setdefault((m.weight_spec, m.act_quant.spec), []).append(name)
    if len(specs) > 1:
        raise ExportError("the quantized linears use different quantization settings "
                          f"({len(specs)} kinds); the export writes one scheme for all of them")
    return next(iter(specs))


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


def _quantized_tensors(quantized: dict, inputs: dict, w_spec, a_spec) -> dict:
    """Each quantized linear's int8 codes and weight scales, and its input scale (and zero point) when static."""
    tensors = {}
    for name, m in quantized.items():
        codes, w_scale, _ = weight_codes_from_fake_quant(m)
        tensors[f"{name}.weight"] = codes
        tensors[f"{name}.weight_scale"] = (w_scale.reshape(-1, 1) if w_spec.granularity == "per-channel"
                                           else w_scale.reshape(1)).to(m.weight.dtype)
        if not a_spec.dynamic:
            scale, zero_point = inputs[name]
            tensors[f"{name}.input_scale"] = scale.reshape(1).to(m.weight.dtype)
            if not a_spec.symmetric:
                tensors[f"{name}.input_zero_point"] = zero_point.reshape(1).to(torch.int8)
    return tensors


def export_compressed_tensors(model: nn.Module, tokenizer, out_dir: Union[str, Path], *,
                              overwrite: bool = False) -> dict:
    """Write a quantized (fake-quant) model as a compressed-tensors W8A8 folder that
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads (with the compressed-tensors package) and
    vLLM serves. Returns a summary: out, scheme, quantized / ignored layer counts, zero biases added, fused groups
    whose ranges were unified. Raises ExportError (nothing written) for what the format cannot express."""
    quantized, floating = _quantized_linears(model)
    w_spec, a_spec = _check_model(model, quantized)
    arch = _architecture(model)
    groups = _fused_groups(model, arch)
    _check_fused_all_or_none(quantized, groups)
    static = not a_spec.dynamic
    if static and a_spec.symmetric and not a_spec.full_range:
        warnings.warn("the model's static symmetric activation codes stop at -127 (the paper's range), where "
                      "compressed-tensors and vLLM clamp at -128: inputs below the calibrated range quantize "
                      "differently there. Quantize with activations.full_range: true (the w8a8-static preset) for "
                      "identical results", stacklevel=2)
    try:
        inputs, unified = _static_input_params(quantized, groups) if static else ({}, [])
    except EngineConversionError as e:  # a static quantizer that was never calibrated
        raise ExportError(str(e)) from None

    tensors = _plain_tensors(model, quantized)
    config, flags, zero_biases = _config_for(model, tensors, arch.bias_flags)
    tensors.update(_quantized_tensors(quantized, inputs, w_spec, a_spec))
    model_class = type(model)
    dtype = next(model.parameters()).dtype

    ignore = sorted(floating)
    scheme = {"targets": ["Linear"], "weights": _quant_args(w_spec, weights=True),
              "input_activations": _quant_args(a_spec, weights=False), "output_activations": None,
              "format": "int-quantized"}
    config.quantization_config = {
        "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
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
    return {"out": str(out), "format": "compressed-tensors", "quantized_linears": len(quantized),
            "ignored_linears": len(ignore), "weights": scheme["weights"], "input_activations":
            scheme["input_activations"], "bias_flags_set": flags, "zero_biases": len(zero_biases),
            "unified_fused_groups": unified}


def export(source: Union[str, Path], format: str = "compressed-tensors", out: Union[str, Path] = None, *,
           overwrite: bool = False, device: str = "cpu") -> dict:
    """Export a folder written by `osengine.quantize(..., out=DIR)` (`osengine quantize --out DIR`)."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r} (supported: {', '.join(FORMATS)})")
    if out is None:
        raise ExportError("export needs an output folder (--out)")
    try:
        manifest = load_quantized_manifest(source)
    except (OSError, ValueError) as e:
        raise ExportError(f"{str(source)!r} is not a folder written by osengine quantize --out ({e})") from None
    if manifest.get("recipe") is not None:  # refuse early, before the model is loaded
        check_recipe(recipe_from_dict(manifest["recipe"]))
    if manifest.get("runtime_shifted_linears"):
        raise ExportError(f"{manifest['runtime_shifted_linears'][0]} cannot be exported as compressed-tensors: "
                          + _spec_problem(None, None, shifted=True))
    if manifest.get("residual_restores"):
        raise ExportError("the model restores its residual stream (X' * s + z, post-LN encoders such as BERT); "
                          "compressed-tensors cannot express that")
    if manifest.get("prefix"):
        raise ExportError(f"the model runs behind a full-precision KV prefix {manifest['prefix']} (its outlier "
                          "tokens); compressed-tensors and vLLM cannot carry one, and without it the static "
                          "activation ranges no longer fit: quantize without a prefix (prefix none) to export")
    refuse_existing_output(out, overwrite, ExportError)
    model, tokenizer, _ = load_quantized(source, device=device)
    return export_compressed_tensors(model, tokenizer, out, overwrite=overwrite)
