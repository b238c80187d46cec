"""A quantized model as a folder: `save_quantized` writes a fake-quantized model as an osengine checkpoint (format in
checkpoint.py) with what is needed to rebuild it, `load_quantized` rebuilds it from the folder alone."""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from ..plugins.registry import resolve_architecture
from ..quant.layers import (
    FakeQuantLinear,
    ResidualRestore,
    RMSNorm,
    install_bmm_quantization,
    install_residual_restore,
    quantize_block,
    wrap_linears,
)
from ..quant.observers import ActQuantizer, checked_prefix
from ..quant.recipes import recipe_from_dict
from ..quant.spec import qparams_from_range, symmetric_weight_codes
from .checkpoint import (
    MANIFEST_FILE,
    TENSORS_FILE,
    CheckpointError,
    load_checkpoint,
    read_manifest,
    refuse_existing_output,
    save_checkpoint,
)
from .sources import is_causal


def is_checkpoint(source) -> bool:
    return Path(str(source)).is_dir() and (Path(str(source)) / MANIFEST_FILE).is_file()


def load_quantized_manifest(path) -> dict:
    """The validated manifest of a quantized folder (CheckpointError if it is not one, or is broken)."""
    return read_manifest(path)


def _deduplicated_state(model: nn.Module) -> Tuple[dict, dict]:
    """(tensors, tied): the state dict with tensors that share storage (tied embeddings / lm_head) stored once;
    tied maps each dropped name to the name that is stored."""
    tensors, tied, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t
    return tensors, tied


def layer_manifest(model: nn.Module, prefix: str = "") -> dict:
    """Per quantized linear: weight and activation specs, the calibrated activation range and its step / zero
    point (static), and whether a runtime shift is applied — what the engine and exporters need. `model` may be one
    block, whose linears are then named with `prefix`."""
    layers = {}
    for name, m in model.named_modules(prefix=prefix):
        if not isinstance(m, FakeQuantLinear) or m.weight_spec is None or m.act_quant is None:
            continue
        spec = m.act_quant.spec
        entry = {"weight": m.weight_spec.to_dict(), "activation": spec.to_dict(), "bias": m.bias is not None,
                 "runtime_shift": m.input_shift is not None, "input_rotation": m.input_rotation,
                 "weight_storage": "codes" if m.weight_spec.symmetric else "float"}
        if not spec.dynamic and bool(torch.isfinite(m.act_quant.lo)) and bool(torch.isfinite(m.act_quant.hi)):
            delta, zp = qparams_from_range(m.act_quant.lo.float(), m.act_quant.hi.float(), spec)
            entry.update(activation_range=[float(m.act_quant.lo), float(m.act_quant.hi)],
                         activation_step=float(delta), activation_zero_point=int(zp))
        layers[name] = entry
    return layers


def migration_tensors(report: Optional[dict]) -> dict:
    """The OS+ shifts and scales of every site (already folded into the weights; kept as a record)."""
    out = {}
    for entry in (report or {}).get("sites", []):
        prefix = f"osengine.migrations.{entry['block']}.{entry['site']}"
        if entry.get("shift_values") is not None:
            out[f"{prefix}.shift"] = entry["shift_values"].float()
        if entry.get("scale_values") is not None:
            out[f"{prefix}.scale"] = entry["scale_values"].float()
    return out


def prefix_tensors(model: nn.Module) -> dict:
    """The prefix's keys and values per layer (calibrate/prefix.py), as osengine.prefix.{layer}.key / .value."""
    out = {}
    for i, (k, v) in enumerate(getattr(model, "osengine_prefix_kv", None) or []):
        out[f"osengine.prefix.{i}.key"] = k.detach().float().cpu().contiguous()
        out[f"osengine.prefix.{i}.value"] = v.detach().float().cpu().contiguous()
    return out


def _prefix_key_values(path: Path, manifest: dict, tensors: dict, prefix: list, n_layers: int) -> list:
    """The stored prefix keys and values, checked: one key and one value per layer, each [kv_heads, len(prefix),
    head_dim], all alike and finite."""
    where = f"osengine checkpoint {str(path)!r}"
    if not prefix:
        return []
    if manifest.get("format_version", 0) < 4:
        raise CheckpointError(f"{where}: it runs behind the prefix {prefix} but was written by an osengine that did "
                              "not store the prefix's keys and values (format version "
                              f"{manifest.get('format_version')}); quantize the model again")
    kv, shape = [], None
    for i in range(n_layers):
        pair = []
        for part in ("key", "value"):
            name = f"osengine.prefix.{i}.{part}"
            t = tensors.get(name)
            if t is None:
                raise CheckpointError(f"{where}: tensor {name!r} (the prefix's {part}s of layer {i}) is missing")
            shape = shape or tuple(t.shape)
            if t.dim() != 3 or tuple(t.shape) != shape or t.shape[1] != len(prefix):
                raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}; expected [kv_heads, "
                                      f"{len(prefix)} (the prefix's length), head_dim] like layer 0's {shape}")
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{where}: tensor {name!r} holds non-finite values")
            pair.append(t.float())
        kv.append(tuple(pair))
    expected = {f"osengine.prefix.{i}.{part}" for i in range(n_layers) for part in ("key", "value")}
    extra = sorted(k for k in tensors if k.startswith("osengine.prefix.") and k not in expected)
    if extra:
        raise CheckpointError(f"{where}: prefix tensors {extra} do not belong to any of the model's {n_layers} layers")
    return kv


def weight_codes_tensors(tensors: dict, layers: dict) -> None:
    """Replace the fake-quantized float weight of every layer stored as codes by its integer codes (int8, int4
    values in int8) and fp32 scales: what the engine and the native runtime run, at a quarter of the size. The
    fake-quantized weight is codes x scale, which `_weights_from_codes` recomputes on load; a weight that codes x
    scale does not reproduce bit for bit stays in floating point (weight_storage "float"), so a reload is exact."""
    for name, entry in layers.items():
        if entry["weight_storage"] != "codes":
            continue
        spec, weight = entry["weight"], tensors[f"{name}.weight"]
        codes, scale, _ = symmetric_weight_codes(weight.detach().float(), spec["bits"], spec["granularity"],
                                                 spec.get("group_size") or 0)
        if not torch.equal(weights_from_codes(codes, scale, spec).to(weight.dtype), weight.detach()):
            # Not on its own grid to the last bit (a weight set by hand, say): kept in floating point, exactly.
            entry["weight_storage"] = "float"
            continue
        del tensors[f"{name}.weight"]
        tensors[f"{name}.weight_codes"] = codes
        tensors[f"{name}.weight_scale"] = scale


def weights_from_codes(codes: torch.Tensor, scale: torch.Tensor, spec: dict) -> torch.Tensor:
    """The fake-quantized float weight codes x scale (fp32) of a layer stored as codes."""
    values = codes.float()
    if spec["granularity"] == "per-group":
        grouped = values.reshape(values.shape[0], -1, spec["group_size"]) * scale[..., None]
        return grouped.reshape_as(values)
    if spec["granularity"] == "per-channel":
        return values * scale[:, None]
    return values * scale


def _checked_weight_spec(path: Path, name: str, entry, recipe) -> dict:
    """A layer entry's weight spec, which must be the recipe's (what the rebuilt layer quantizes with)."""
    where = f"osengine checkpoint {str(path)!r}: osengine.json layers[{name!r}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("weight"), dict):
        raise CheckpointError(f"{where} must be a mapping with a 'weight' spec, got {entry!r}")
    spec, want = entry["weight"], recipe.weights
    for key in ("bits", "symmetric", "granularity", "group_size"):
        if spec.get(key) != getattr(want, key):
            raise CheckpointError(f"{where}.weight.{key} is {spec.get(key)!r} but the recipe says "
                                  f"{getattr(want, key)!r}")
    return spec


def _weights_from_codes(path: Path, manifest: dict, state: dict) -> None:
    """Put back `L.weight` for each layer stored as codes (format version 2), checking the codes and scales."""
    recipe = recipe_from_dict(manifest["recipe"])
    layers = manifest.get("layers", {})
    if not isinstance(layers, dict):
        raise CheckpointError(f"osengine checkpoint {str(path)!r}: osengine.json 'layers' must be a mapping")
    for name, entry in layers.items():
        spec = _checked_weight_spec(path, name, entry, recipe)
        if entry.get("weight_storage", "float") not in ("codes", "float"):   # version 1: no field, float
            raise CheckpointError(f"osengine checkpoint {str(path)!r}: osengine.json layers[{name!r}].weight_storage "
                                  f"must be 'codes' or 'float', got {entry.get('weight_storage')!r}")
        if entry.get("weight_storage") != "codes":
            continue
        codes, scale = state.pop(f"{name}.weight_codes", None), state.pop(f"{name}.weight_scale", None)
        if codes is None or scale is None:
            raise CheckpointError(f"osengine checkpoint {str(path)!r}: layer {name!r} is stored as codes but "
                                  f"{name}.weight_codes or {name}.weight_scale is missing")
        qmax = 2 ** (spec["bits"] - 1) - 1
        groups = {"per-channel": (codes.shape[0],), "per-tensor": (1,),
                  "per-group": (codes.shape[0], codes.shape[-1] // (spec.get("group_size") or 1))}
        expected = groups.get(spec["granularity"])
        if codes.dtype != torch.int8 or codes.dim() != 2 or scale.dtype != torch.float32 \
                or tuple(scale.shape) != expected:
            raise CheckpointError(f"osengine checkpoint {str(path)!r}: layer {name!r} needs int8 codes [out, in] and "
                                  f"float32 scales {list(expected or [])}, found {codes.dtype} {list(codes.shape)} "
                                  f"and {scale.dtype} {list(scale.shape)}")
        if codes.numel() and (int(codes.min()) < -qmax or int(codes.max()) > qmax):  # int8 abs(-128) is -128
            raise CheckpointError(f"osengine checkpoint {str(path)!r}: layer {name!r} has weight codes outside "
                                  f"[-{qmax}, {qmax}] ({spec['bits']}-bit symmetric)")
        if not bool(torch.isfinite(scale).all()):
            raise CheckpointError(f"osengine checkpoint {str(path)!r}: layer {name!r} has non-finite weight scales")
        state[f"{name}.weight"] = weights_from_codes(codes, scale, spec)


def save_quantized(model: nn.Module, tokenizer, out_dir: Union[str, Path], manifest: dict,
                   overwrite: bool = False, extra_tensors: Optional[dict] = None,
                   extra_files: Optional[dict] = None) -> Path:
    """Write a fake-quantized model as an osengine checkpoint (atomically; see checkpoint.py): model.safetensors
    (every weight, tied ones once, plus the OS+ shifts and scales), osengine.json (recipe, strategy, per-layer
    quantization parameters, the structure to rebuild), and the model's config and tokenizer files, so that the
    folder is self-contained."""
    tensors, tied = _deduplicated_state(model)
    layers = layer_manifest(model)
    weight_codes_tensors(tensors, layers)
    tensors.update(migration_tensors(getattr(model, "osengine_report", None)))
    tensors.update(prefix_tensors(model))
    tensors.update(extra_tensors or {})
    full = {"kind": "fake-quant", **manifest, "tied": tied, "layers": layers}
    with model_side_files(model, tokenizer) as side:
        return save_checkpoint(out_dir, tensors, full, extra_files={**(extra_files or {}), **side},
                               overwrite=overwrite)


@contextlib.contextmanager
def model_side_files(model: nn.Module, tokenizer):
    """{file name: path} of the model's config, generation config and tokenizer files, written to a temporary
    folder that lives as long as the context: what a quantized folder carries beside its tensors."""
    if not getattr(model.config, "architectures", None):  # so that loading rebuilds this class, not the bare base
        model.config.architectures = [type(model).__name__]
    with tempfile.TemporaryDirectory() as side:
        model.config.save_pretrained(side)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(side)
        if tokenizer is not None:
            tokenizer.save_pretrained(side)
        yield {p.name: p for p in Path(side).iterdir() if p.is_file()}


def _rebuild_structure(model: nn.Module, manifest: dict) -> None:
    """Give a freshly built model what calibration added before its weights are loaded: fake-quant linears with the
    recipe's specs, residual restores, added biases, runtime shifts, BMM-input quantizers."""
    recipe = recipe_from_dict(manifest["recipe"])
    arch = resolve_architecture(model)
    for name in arch.blocks(model):
        block = model.get_submodule(name)
        wrap_linears(block)
        quantize_block(block, name, recipe)
    restore_structure(model, manifest)
    if recipe.bmm_inputs:
        install_bmm_quantization(model, arch.attention_modules(model), recipe.activations)
    try:
        prefix = checked_prefix(manifest.get("prefix", []), getattr(model.config, "vocab_size", None),
                                "osengine.json")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model.osengine_prefix = list(prefix)


def restore_structure(model: nn.Module, structure: dict) -> None:
    """Put back what `structure_manifest` recorded (residual restores, added biases, runtime shifts), with zero
    values that the loaded tensors then replace."""
    device = next(model.parameters()).device
    for name in structure.get("residual_restores", []):
        install_residual_restore(model.get_submodule(name), structure["residual_channels"][name])
    for name in structure.get("linears_with_added_bias", []):
        lin = model.get_submodule(name)
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=device))
    for name in structure.get("runtime_shifted_linears", []):
        lin = model.get_submodule(name)
        lin.input_shift = torch.zeros(lin.in_features, dtype=lin.weight.dtype, device=device)
    for name, kind in structure.get("rotated_linears", {}).items():
        model.get_submodule(name).set_input_rotation(kind)
    for name, eps in structure.get("rms_norms", {}).items():   # rotated LayerNorm models
        norm = model.get_submodule(name)
        model.set_submodule(name, RMSNorm(norm.weight.numel(), float(eps)).to(device))


def owning_block(name: str, block_names: list) -> Optional[int]:
    """The index of the block a state entry (or module) name belongs to, or None outside the blocks."""
    for i, block in enumerate(block_names):
        if name.startswith(block + "."):
            return i
    return None


def load_quantized(path: Union[str, Path], device: str = "cpu"):
    """(model, tokenizer, manifest): rebuild the fake-quantized model from a checkpoint folder alone (its config,
    tokenizer and weights; the base model is not needed), validating every tensor."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tensors, manifest = load_checkpoint(path)
    if manifest.get("kind") != "fake-quant":
        raise CheckpointError(f"osengine checkpoint {str(path)!r}: kind {manifest.get('kind')!r} is not "
                              f"'fake-quant'")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"osengine checkpoint {str(path)!r}: config.json is missing")
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForCausalLM if is_causal(config) else AutoModel
    model = cls.from_config(config, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    try:
        _rebuild_structure(model, manifest)
        model.osengine_prefix_kv = _prefix_key_values(path, manifest, tensors, model.osengine_prefix,
                                                      len(resolve_architecture(model).blocks(model)))
        state = {k: v for k, v in tensors.items() if not k.startswith("osengine.")}
        _weights_from_codes(path, manifest, state)
        for alias, stored in manifest.get("tied", {}).items():
            if stored not in state:
                raise CheckpointError(f"osengine checkpoint {str(path)!r}: tied tensor {alias!r} refers to "
                                      f"{stored!r}, which is not stored")
            state[alias] = state[stored]
    except (KeyError, TypeError, AttributeError, IndexError) as e:   # a field missing or of the wrong type
        raise CheckpointError(f"osengine checkpoint {str(path)!r}: {MANIFEST_FILE} is malformed "
                              f"({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"osengine checkpoint {str(path)!r}: its tensors do not fit the model its config "
                              f"describes: {e}") from None
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.mode = "quantize"
    return model.to(device).eval(), tokenizer, manifest


def structure_manifest(model: nn.Module, base: nn.Module = None) -> dict:
    """What load_quantized must recreate before loading weights: residual restores, added biases, runtime shifts,
    online input rotations."""
    restores, channels, biased, shifted, rotated, rms_norms = [], {}, [], [], {}, {}
    for name, m in model.named_modules():
        if isinstance(m, ResidualRestore):
            owner = name.rsplit(".", 1)[0]
            restores.append(owner)
            channels[owner] = m.scale.numel()
        if isinstance(m, RMSNorm):
            rms_norms[name] = m.variance_epsilon
        if type(m) is nn.Linear and m.bias is not None:   # e.g. an lm_head that absorbed a LayerNorm's bias
            biased.append(name)
        if isinstance(m, FakeQuantLinear):
            if m.bias is not None:
                biased.append(name)
            if m.input_shift is not None:
                shifted.append(name)
            if m.input_rotation is not None:
                rotated[name] = m.input_rotation
    return {"residual_restores": restores, "residual_channels": channels, "linears_with_added_bias": biased,
            "runtime_shifted_linears": shifted, "rotated_linears": rotated, "rms_norms": rms_norms}


def upgrade_quantized(source: Union[str, Path], out: Union[str, Path], overwrite: bool = False) -> Path:
    """Write the quantized folder `source`, of any format version this osengine reads, into `out` in the current
    one (format 2: weights as integer codes, which the native runtime reads). The model, its recorded OS+ shifts and
    scales and the folder's other files (report, plots) are carried over unchanged."""
    source = Path(source)
    refuse_existing_output(out, overwrite)
    model, tokenizer, manifest = load_quantized(source)
    tensors, _ = load_checkpoint(source)
    records = {name: t for name, t in tensors.items() if name.startswith("osengine.")}
    written_here = {"kind", "tied", "layers", "format", "format_version", "tensors"}
    kept = {k: v for k, v in manifest.items() if k not in written_here}
    others = {p.name: p for p in source.iterdir()
              if p.is_file() and p.name not in (MANIFEST_FILE, TENSORS_FILE) and not p.name.startswith(".")}
    return save_quantized(model, tokenizer, out, kept, overwrite=overwrite, extra_tensors=records, extra_files=others)
