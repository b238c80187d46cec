"""Quantization recipes: YAML files or named presets (python/osengine/quant/presets/*.yaml), validated field by
field."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .observers import checked_prefix
from .spec import GRANULARITIES, OBSERVERS, WEIGHT_OBSERVERS, WEIGHT_ROUNDINGS, WEIGHT_SCALE_DTYPES, QuantSpec

PRESET_DIR = Path(__file__).parent / "presets"
ALWAYS_FP = ("lm_head", "embeddings")  # outside the transformer blocks: never quantized in this version


class RecipeError(ValueError):
    """A recipe field is missing, unknown or out of range; the message names the field."""


@dataclass(frozen=True)
class Recipe:
    name: str
    weights: QuantSpec
    activations: QuantSpec
    bmm_inputs: bool = False
    keep_fp: tuple = ALWAYS_FP
    description: str = ""
    # Outlier tokens kept as a full-precision KV prefix (calibrate/prefix.py): "none", "auto" (detected on the
    # calibration data; causal language models only, nothing for others) or a tuple of token ids.
    prefix: Union[str, tuple] = "none"
    # Block linears (by name suffix, as keep_fp) whose inputs are quantized otherwise than `activations`, e.g.
    # {"down_proj": per-token dynamic} in a static recipe: ((suffix, QuantSpec), ...), the first match wins.
    activation_overrides: tuple = ()

    def activation_spec(self, linear_name: str) -> QuantSpec:
        """The activation spec of a block linear: its override, else the recipe's."""
        for suffix, spec in self.activation_overrides:
            if _matches(linear_name, suffix):
                return spec
        return self.activations

    def to_dict(self) -> dict:
        w = {k: v for k, v in self.weights.to_dict().items()
             if k in ("bits", "symmetric", "granularity", "group_size", "observer", "rounding", "scale_dtype")}
        a = _activation_dict(self.activations)
        return {"name": self.name, "weights": w, "activations": a,
                "bmm_inputs": self.bmm_inputs, "keep_fp": list(self.keep_fp),
                "prefix": self.prefix if isinstance(self.prefix, str) else list(self.prefix),
                "activation_overrides": {k: _activation_dict(v) for k, v in self.activation_overrides}}

    def keeps_fp(self, linear_name: str) -> bool:
        """True when a block linear (e.g. "mlp.down_proj") matches a keep_fp entry (by its last name components)."""
        return any(_matches(linear_name, entry) for entry in self.keep_fp)


def _matches(linear_name: str, suffix: str) -> bool:
    """True when `suffix` (e.g. "down_proj" or "mlp.down_proj") names the last components of `linear_name`."""
    e = suffix.split(".")
    return linear_name.split(".")[-len(e):] == e


def _activation_dict(spec: QuantSpec) -> dict:
    return {k: v for k, v in spec.to_dict().items() if k not in ("rounding", "scale_dtype")}


def preset_names() -> list:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _spec(raw: Any, where: str, is_weight: bool) -> QuantSpec:
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe field '{where}' must be a mapping, got {type(raw).__name__}")
    allowed = {"bits", "symmetric", "granularity", "group_size", "observer"} | (
        {"rounding", "scale_dtype"} if is_weight else {"dynamic", "quantile", "full_range"})
    unknown = set(raw) - allowed
    if unknown:
        raise RecipeError(f"recipe field '{where}.{sorted(unknown)[0]}' is unknown (allowed: {sorted(allowed)})")
    bits = raw.get("bits", 8)
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise RecipeError(f"recipe field '{where}.bits' must be an integer in 2..8, got {bits!r}")
    sym = raw.get("symmetric", True)
    if not isinstance(sym, bool):
        raise RecipeError(f"recipe field '{where}.symmetric' must be true or false, got {sym!r}")
    gran = raw.get("granularity", "per-channel" if is_weight else "per-tensor")
    ok = ("per-tensor", "per-channel", "per-group") if is_weight else ("per-tensor", "per-token", "per-group")
    if gran not in ok:
        raise RecipeError(f"recipe field '{where}.granularity' must be one of {list(ok)}, got {gran!r}"
                          + ("" if gran in GRANULARITIES else f" (known granularities: {list(GRANULARITIES)})"))
    group = raw.get("group_size")
    if gran == "per-group":
        if not isinstance(group, int) or isinstance(group, bool) or group < 1:
            raise RecipeError(f"recipe field '{where}.group_size' must be a positive integer for per-group, "
                              f"got {group!r}")
    elif group is not None:
        raise RecipeError(f"recipe field '{where}.group_size' is only meaningful with granularity per-group")
    if is_weight:
        observer = raw.get("observer", "minmax")
        if observer not in WEIGHT_OBSERVERS:
            raise RecipeError(f"recipe field '{where}.observer' must be one of {list(WEIGHT_OBSERVERS)} for weights, "
                              f"got {observer!r}")
        rounding = raw.get("rounding", "nearest")
        if rounding not in WEIGHT_ROUNDINGS:
            raise RecipeError(f"recipe field '{where}.rounding' must be one of {list(WEIGHT_ROUNDINGS)}, "
                              f"got {rounding!r}")
        scale_dtype = raw.get("scale_dtype", "float32")
        if scale_dtype not in WEIGHT_SCALE_DTYPES:
            raise RecipeError(f"recipe field '{where}.scale_dtype' must be one of {list(WEIGHT_SCALE_DTYPES)}, "
                              f"got {scale_dtype!r}")
        return QuantSpec(bits=bits, symmetric=sym, granularity=gran, group_size=group, observer=observer,
                         rounding=rounding, scale_dtype=scale_dtype)
    dynamic = raw.get("dynamic", gran != "per-tensor")
    if not isinstance(dynamic, bool):
        raise RecipeError(f"recipe field '{where}.dynamic' must be true or false, got {dynamic!r}")
    if not dynamic and gran != "per-tensor":
        raise RecipeError(f"recipe field '{where}.dynamic' must be true for granularity {gran} "
                          "(static activation ranges are per-tensor)")
    observer = raw.get("observer", "minmax")
    if observer not in OBSERVERS:
        raise RecipeError(f"recipe field '{where}.observer' must be one of {list(OBSERVERS)}, got {observer!r}")
    if dynamic and observer == "search":
        raise RecipeError(f"recipe field '{where}.observer': 'search' chooses a static range; dynamic activations "
                          "compute theirs per call (set dynamic: false, or leave the observer out)")
    q = raw.get("quantile", 0.995)
    if not isinstance(q, (int, float)) or not 0.5 < q <= 1.0:
        raise RecipeError(f"recipe field '{where}.quantile' must be a number in (0.5, 1], got {q!r}")
    full = raw.get("full_range", False)
    if not isinstance(full, bool):
        raise RecipeError(f"recipe field '{where}.full_range' must be true or false, got {full!r}")
    if full and (not sym or dynamic):
        raise RecipeError(f"recipe field '{where}.full_range' applies to static symmetric activations only "
                          "(asymmetric codes already use the full range; dynamic ranges are taken from the data)")
    return QuantSpec(bits=bits, symmetric=sym, granularity=gran, group_size=group, dynamic=dynamic,
                     observer=observer, quantile=float(q), full_range=full)


def recipe_from_dict(raw: Any, default_name: str = "custom") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a mapping with fields weights/activations, got {type(raw).__name__}")
    allowed = {"name", "description", "weights", "activations", "bmm_inputs", "keep_fp", "prefix",
               "activation_overrides"}
    unknown = set(raw) - allowed
    if unknown:
        raise RecipeError(f"recipe field '{sorted(unknown)[0]}' is unknown (allowed: {sorted(allowed)})")
    for req in ("weights", "activations"):
        if req not in raw:
            raise RecipeError(f"recipe field '{req}' is missing")
    bmm = raw.get("bmm_inputs", False)
    if not isinstance(bmm, bool):
        raise RecipeError(f"recipe field 'bmm_inputs' must be true or false, got {bmm!r}")
    keep = raw.get("keep_fp", list(ALWAYS_FP))
    if not isinstance(keep, (list, tuple)) or not all(isinstance(k, str) and k for k in keep):
        raise RecipeError(f"recipe field 'keep_fp' must be a list of layer names, got {keep!r}")
    missing = [n for n in ALWAYS_FP if n not in keep]
    if missing:
        raise RecipeError(f"recipe field 'keep_fp' must contain {missing[0]!r}: quantizing lm_head or embeddings "
                          "is not supported (only the linear layers inside transformer blocks are quantized)")
    acts = _spec(raw["activations"], "activations", is_weight=False)
    return Recipe(name=str(raw.get("name", default_name)), weights=_spec(raw["weights"], "weights", True),
                  activations=acts, bmm_inputs=bmm, keep_fp=tuple(dict.fromkeys(keep)),
                  description=str(raw.get("description", "")), prefix=_prefix_field(raw.get("prefix", "none")),
                  activation_overrides=_overrides_field(raw.get("activation_overrides", {})))


def _overrides_field(value: Any) -> tuple:
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise RecipeError("recipe field 'activation_overrides' must map layer names (e.g. down_proj) to activation "
                          f"specs, got {value!r}")
    return tuple((name, _spec(spec, f"activation_overrides.{name}", is_weight=False)) for name, spec in value.items())


def _prefix_field(value: Any) -> Union[str, tuple]:
    if value in ("none", "auto"):
        return value
    try:
        ids = checked_prefix(value, None, "recipe field 'prefix'")
    except ValueError:
        ids = []
    if not ids:
        raise RecipeError(f"recipe field 'prefix' must be auto, none or a list of token ids, got {value!r}")
    return tuple(ids)


def load_recipe(recipe: Union[str, Path, dict, Recipe], keep_fp: tuple = (),
                weight_rounding: Optional[str] = None) -> Recipe:
    """A preset name, a path to a YAML file, a dict, or a Recipe; `keep_fp` adds layers kept in floating point;
    `weight_rounding` ("nearest" or "gptq") replaces the recipe's weights.rounding."""
    if isinstance(recipe, Recipe):
        r = recipe
    elif isinstance(recipe, dict):
        r = recipe_from_dict(recipe)
    elif isinstance(recipe, (str, Path)):
        path = Path(recipe)
        if str(recipe) in preset_names():
            path = PRESET_DIR / f"{recipe}.yaml"
        elif path.suffix not in (".yaml", ".yml") or not path.is_file():
            raise RecipeError(f"recipe {str(recipe)!r} is neither a preset ({', '.join(preset_names())}) "
                              "nor an existing .yaml file")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe file {path} is not valid YAML: {e}") from None
        r = recipe_from_dict(raw, default_name=path.stem)
    else:
        raise RecipeError(f"recipe must be a preset name, a YAML path or a dict, got {type(recipe).__name__}")
    if keep_fp:
        r = replace(r, keep_fp=tuple(dict.fromkeys(tuple(r.keep_fp) + tuple(keep_fp))))
    if weight_rounding is not None:
        if weight_rounding not in WEIGHT_ROUNDINGS:
            raise RecipeError(f"recipe field 'weights.rounding' must be one of {list(WEIGHT_ROUNDINGS)}, "
                              f"got {weight_rounding!r}")
        r = replace(r, weights=replace(r.weights, rounding=weight_rounding))
    return r
