"""The public plugin API: what strategy and architecture plugins subclass and call, and the registry that finds them.

Two kinds of plugins, found through entry-point groups (lazily, on first use):
    osengine.strategies     -> a Strategy subclass: decides the shift z and scale s for each migration site
    osengine.architectures  -> an Architecture subclass: names a model's blocks and migration sites
The built-in plugins (package osengine_plugins) use nothing but this module. See docs/plugins.md.
"""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
import traceback
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizers import FakeQuantLinear, QuantSpec, quantize_dynamic, quantize_weight, quantize_with_range

STRATEGY_GROUP = "osengine.strategies"
ARCHITECTURE_GROUP = "osengine.architectures"
PLUGIN_GUIDE = "docs/plugins.md"


class PluginError(RuntimeError):
    """A plugin is unknown, duplicated, badly configured, or cannot handle the model it was given."""


# ----------------------------------------------------------------------------------------------------------------
# What architectures describe
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class MigrationSite:
    """One activation X that OS+ transforms: X' = (X - z) / s.

    producer       module (full name in the model) whose output is X; 1/s (and -z/s) is folded into it
    producer_kind  "layernorm" (weight and bias), "rmsnorm" (weight only) or "linear_rows" (rows of a linear,
                   e.g. up_proj for LLaMA's down_proj input SiLU(gate) * up)
    consumers      linears (full names) that read X; W <- W * s (columns), b <- b + W z
    inspect        how the output that the loss inspects is computed from X (see LinearOutput, GatedOutput,
                   AttentionOutput)
    residual       post-LN models: the module that receives X as its second (residual) input; it gets X' * s + z
    block_input    True when X is the input of the block being calibrated (post-LN: the previous block's last
                   LayerNorm); the calibration driver then transforms its cached block inputs too
    """
    name: str
    producer: str
    producer_kind: str
    consumers: list
    inspect: "Inspector"
    residual: Optional[str] = None
    block_input: bool = False

    def __post_init__(self):
        if self.producer_kind not in ("layernorm", "rmsnorm", "linear_rows"):
            raise PluginError(f"MigrationSite {self.name!r}: producer_kind must be layernorm, rmsnorm or "
                              f"linear_rows, got {self.producer_kind!r}")
        if not self.consumers:
            raise PluginError(f"MigrationSite {self.name!r}: consumers is empty")


@dataclass
class Migration:
    """A strategy's decision for one site. shift None = no shift; scale None = all ones.
    runtime_shift: the shift is not folded into the producer but subtracted at run time before quantization
    (the engine's fused shift-add); needed for RMSNorm producers."""
    shift: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    runtime_shift: bool = False
    info: dict = field(default_factory=dict)


class Inspector(ABC):
    """Computes the output the scale search looks at, from the site input x [batch, tokens, channels] and
    the consumers' (weight, bias) pairs. `call` is the captured call of `module` (args, kwargs), if any."""
    module: Optional[str] = None

    @abstractmethod
    def __call__(self, model: nn.Module, site: MigrationSite, x: torch.Tensor, weights: list, call) -> torch.Tensor:
        ...


class LinearOutput(Inspector):
    """X W^T + b of every consumer, concatenated (OPT fc1 pre-activation, LLaMA down_proj)."""

    def __call__(self, model, site, x, weights, call):
        return torch.cat([F.linear(x, w, b) for w, b in weights], dim=-1)


class GatedOutput(Inspector):
    """act(X Wg^T) * (X Wu^T) for consumers [gate, up] (LLaMA MLP)."""

    def __init__(self, act: Callable = F.silu):
        self.act = act

    def __call__(self, model, site, x, weights, call):
        (wg, bg), (wu, bu) = weights
        return self.act(F.linear(x, wg, bg)) * F.linear(x, wu, bu)


class _StopForward(Exception):
    pass


class AttentionOutput(Inspector):
    """Runs the model's own attention module (its mask, RoPE, ALiBi, GQA) with the candidate q/k/v weights and returns
    the attention output before the output projection `before` (or the module's first output when None)."""

    def __init__(self, module: str, before: Optional[str] = None):
        self.module, self.before = module, before

    def __call__(self, model, site, x, weights, call):
        attn = model.get_submodule(self.module)
        consumers = [model.get_submodule(n) for n in site.consumers]
        saved = [(c.weight, c.bias) for c in consumers]
        captured = []

        def stop(_module, args):
            captured.append(args[0])
            raise _StopForward

        hook = model.get_submodule(self.before).register_forward_pre_hook(stop) if self.before else None
        args, kwargs = call
        if args:
            args = (x,) + tuple(args[1:])
        else:
            kwargs = dict(kwargs, hidden_states=x)
        try:
            for c, (w, b) in zip(consumers, weights):
                c.weight = nn.Parameter(w, requires_grad=False)
                c.bias = None if b is None else nn.Parameter(b, requires_grad=False)
            try:
                out = attn(*args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
            except _StopForward:
                out = captured[0]
        finally:
            for c, (w, b) in zip(consumers, saved):
                c.weight, c.bias = w, b
            if hook is not None:
                hook.remove()
        return out.float()


# ----------------------------------------------------------------------------------------------------------------
# What strategies see: one site's calibration data and the inspected-output error
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class SiteData:
    """Calibration data of one site, handed to Strategy.migrate.

    inputs         FP inputs X of the consumers, one [batch, tokens, channels] tensor per calibration batch
                   (they came through the already-quantized earlier blocks)
    search_inputs  the first few batches, on which `error` evaluates candidates
    calls          the captured calls of site.inspect.module for the search batches (attention sites)
    token_masks    per input batch, a [batch, tokens] boolean mask of the real tokens, or None (no padding);
                   padding tokens count neither in the channel ranges nor in `error`
    """
    model: nn.Module
    site: MigrationSite
    weight_spec: QuantSpec
    act_spec: QuantSpec
    inputs: list
    search_inputs: list
    calls: list
    quantized: list                      # per consumer: False when the recipe keeps it in floating point
    scale_search_min: float = 1.0        # the architecture's lower end of OS+'s t grid
    smoothquant_alpha: float = 0.5       # the architecture's default SmoothQuant migration strength
    shift_foldable: bool = True          # False for RMSNorm / linear-row producers (runtime shift only)
    token_masks: Optional[list] = None
    _reference: Optional[list] = None

    @property
    def channels(self) -> int:
        return self.inputs[0].shape[-1]

    def _mask(self, i: int) -> Optional[torch.Tensor]:
        return None if self.token_masks is None or i >= len(self.token_masks) else self.token_masks[i]

    def tokens(self, i: int) -> torch.Tensor:
        """The real (non-padding) tokens of input batch i, [n, channels]."""
        x, m = self.inputs[i], self._mask(i)
        return x.reshape(-1, self.channels) if m is None else x[m.to(x.device)]

    def channel_min(self) -> torch.Tensor:
        return torch.stack([self.tokens(i).amin(0) for i in range(len(self.inputs))]).amin(0)

    def channel_max(self) -> torch.Tensor:
        return torch.stack([self.tokens(i).amax(0) for i in range(len(self.inputs))]).amax(0)

    def weights(self) -> list:
        """The consumers' current (weight, bias), fp32."""
        out = []
        for n in self.site.consumers:
            m = self.model.get_submodule(n)
            out.append((m.weight.detach().float(), None if m.bias is None else m.bias.detach().float()))
        return out

    def reference(self) -> list:
        if self._reference is None:
            w = self.weights()
            self._reference = [self.site.inspect(self.model, self.site, x, w, c)
                               for x, c in zip(self.search_inputs, self.calls)]
        return self._reference

    def error(self, shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
              clip: Optional[float] = None, quantize: bool = True) -> float:
        """Mean over tokens of the squared L2 error of the inspected output, after transforming the site with
        (shift, scale) and fake-quantizing the consumers' weights and input. `clip`: per-tensor activation range
        (-clip, clip) as in OS+'s search; None uses the recipe's own (dynamic) activation quantizer."""
        weights = []
        for (w, b), q in zip(self.weights(), self.quantized):
            b_new = b
            if shift is not None:
                b_new = (torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b) + w @ shift
            w_new = w * scale if scale is not None else w
            if quantize and q:
                w_new = quantize_weight(w_new, self.weight_spec)
            weights.append((w_new, b_new))
        total, tokens = 0.0, 0
        for i, (x, call, ref) in enumerate(zip(self.search_inputs, self.calls, self.reference())):
            xs = x.float()
            if shift is not None:
                xs = xs - shift
            if scale is not None:
                xs = xs / scale
            if quantize:
                if clip is not None and self.act_spec.granularity == "per-tensor":
                    xs = quantize_with_range(xs, -clip, clip, self.act_spec)
                elif self.act_spec.dynamic:
                    xs = quantize_dynamic(xs, self.act_spec)
                else:  # static per-tensor without a given clip: the MinMax range of this batch's real tokens
                    real = xs if self._mask(i) is None else xs[self._mask(i).to(xs.device)]
                    xs = quantize_with_range(xs, real.min().item(), real.max().item(), self.act_spec)
            out = self.site.inspect(self.model, self.site, xs.to(x.dtype), weights, call)
            err = (out.float() - ref.float()).pow(2).sum(-1)
            mask = self._mask(i)
            if mask is not None:
                err = err[mask.to(err.device)]
            total += err.sum().item()
            tokens += err.numel()
        return total / max(tokens, 1)


# ----------------------------------------------------------------------------------------------------------------
# Plugin base classes
# ----------------------------------------------------------------------------------------------------------------

class Strategy(ABC):
    """Calibration strategy. Subclasses set `name` and `description`, take their options as keyword arguments of
    __init__, and implement `migrate`. Returning None leaves the site untouched (plain MinMax quantization)."""
    name: str = ""
    description: str = ""

    @abstractmethod
    def migrate(self, data: SiteData) -> Optional[Migration]:
        ...


class Architecture(ABC):
    """Model architecture. Subclasses set `name`, `model_types` (Hugging Face config.model_type values) and
    implement `blocks` and `sites`."""
    name: str = ""
    description: str = ""
    model_types: tuple = ()
    scale_search_min: float = 1.0      # lower end of OS+'s t grid (paper: 1.0 OPT/BLOOM, 0.1 LLaMA)
    smoothquant_alpha: float = 0.5

    def matches(self, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in self.model_types

    @abstractmethod
    def blocks(self, model: nn.Module) -> list:
        """Full names of the transformer blocks, in execution order."""

    @abstractmethod
    def sites(self, model: nn.Module, index: int) -> list:
        """MigrationSites of block `index`, in execution order."""

    def attention_modules(self, model: nn.Module) -> list:
        """Attention modules whose BMM inputs a recipe may quantize (through transformers' AttentionInterface).
        An empty list means the architecture does not support BMM-input quantization."""
        return []


# ----------------------------------------------------------------------------------------------------------------
# Folding: the equivalent transformation
# ----------------------------------------------------------------------------------------------------------------

class ResidualRestore(nn.Module):
    """Post-LN models: the residual branch must see the untransformed X = X' * s + z."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("shift", torch.zeros(channels))

    def forward(self, x):
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def _restore_residual_hook(module, args, kwargs):
    if len(args) >= 2:
        args = (args[0], module.osengine_residual(args[1])) + tuple(args[2:])
    else:
        kwargs = dict(kwargs, input_tensor=module.osengine_residual(kwargs["input_tensor"]))
    return args, kwargs


def install_residual_restore(module: nn.Module, channels: int) -> ResidualRestore:
    if not hasattr(module, "osengine_residual"):
        module.osengine_residual = ResidualRestore(channels).to(next(module.parameters()).device)
        module.register_forward_pre_hook(_restore_residual_hook, with_kwargs=True)
    return module.osengine_residual


def apply_migration(model: nn.Module, site: MigrationSite, migration: Migration) -> None:
    """Fold X' = (X - z) / s into the producer and compensate in the consumers (exact in floating point)."""
    producer = model.get_submodule(site.producer)
    consumers = [model.get_submodule(n) for n in site.consumers]
    ref = consumers[0].weight
    channels = consumers[0].in_features
    s = migration.scale
    s = torch.ones(channels, dtype=torch.float32, device=ref.device) if s is None else s.float().to(ref.device)
    z = None if migration.shift is None else migration.shift.float().to(ref.device)
    folded_z = z if (z is not None and not migration.runtime_shift) else None
    if s.shape != (channels,) or (z is not None and z.shape != (channels,)):
        raise PluginError(f"site {site.name}: shift/scale must have shape ({channels},)")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise PluginError(f"site {site.name}: scales must be finite and positive")
    if folded_z is not None and not (site.producer_kind == "layernorm" and getattr(producer, "bias", None) is not None):
        raise PluginError(f"site {site.name}: a shift cannot be folded into {site.producer_kind} "
                          f"{site.producer}; use a runtime shift")
    if migration.runtime_shift and not all(isinstance(c, FakeQuantLinear) for c in consumers):
        raise PluginError(f"site {site.name}: a runtime shift needs FakeQuantLinear consumers")
    with torch.no_grad():
        if site.producer_kind in ("layernorm", "rmsnorm"):
            if folded_z is not None:
                producer.bias.copy_(((producer.bias.float() - folded_z) / s).to(producer.bias.dtype))
            elif getattr(producer, "bias", None) is not None:
                producer.bias.copy_((producer.bias.float() / s).to(producer.bias.dtype))
            producer.weight.copy_((producer.weight.float() / s).to(producer.weight.dtype))
        else:  # linear_rows
            producer.weight.copy_((producer.weight.float() / s[:, None]).to(producer.weight.dtype))
            if producer.bias is not None:
                producer.bias.copy_((producer.bias.float() / s).to(producer.bias.dtype))
        for c in consumers:
            w = c.weight.float()
            if z is not None:
                b = w @ z if c.bias is None else c.bias.float() + w @ z
                c.bias = nn.Parameter(b.to(c.weight.dtype), requires_grad=c.weight.requires_grad)
            c.weight.copy_((w * s).to(c.weight.dtype))
            if migration.runtime_shift:
                c.input_shift = (z / s).to(c.weight.dtype)
        if site.residual is not None:
            restore = install_residual_restore(model.get_submodule(site.residual), channels)
            if folded_z is not None:  # compose with an existing restore: x -> (x * s) * s0 + (z * s0 + z0)
                restore.shift.copy_(folded_z * restore.scale + restore.shift)
            restore.scale.mul_(s)


# ----------------------------------------------------------------------------------------------------------------
# Registry: entry points, discovered lazily; duplicates rejected; broken plugins reported and skipped
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class PluginInfo:
    kind: str
    name: str
    obj: type
    source: str


class Registry:
    def __init__(self, kind: str, group: str, base: type):
        self.kind, self.group, self.base = kind, group, base
        self._plugins: dict = {}
        self.errors: list = []           # (name, source, traceback text)
        self._discovered = False

    def register(self, obj: type, name: Optional[str] = None, source: str = "registered at run time") -> type:
        """Register a plugin class directly (what an entry point does, without installing a package)."""
        name = name or getattr(obj, "name", "")
        if not isinstance(obj, type) or not issubclass(obj, self.base):
            raise PluginError(f"{self.kind} plugin {name!r} ({source}) is not a subclass of "
                              f"osengine.plugin_api.{self.base.__name__}")
        if not name:
            raise PluginError(f"{self.kind} plugin {obj.__qualname__} ({source}) has no name")
        if name in self._plugins:
            raise PluginError(f"duplicate {self.kind} plugin name {name!r}: {source} clashes with "
                              f"{self._plugins[name].source}")
        obj.name = name
        self._plugins[name] = PluginInfo(self.kind, name, obj, source)
        return obj

    def _entry_points(self) -> list:
        eps = [(ep, f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution")
               for ep in metadata.entry_points(group=self.group)]
        if not any(ep.dist is not None and ep.dist.name == "osengine" for ep, _ in eps):
            eps += _source_checkout_entry_points(self.group)
        # built-in plugins first, so that a third-party plugin cannot take a built-in name
        builtin = lambda item: item[1].startswith("osengine ") or item[1].startswith("osengine source")
        return sorted(eps, key=lambda item: not builtin(item))

    def discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for ep, dist in self._entry_points():
            source = f"{dist} (entry point {ep.value})"
            try:
                self.register(ep.load(), name=ep.name, source=source)
            except Exception:  # a broken plugin must never take the host down: report and skip it
                tb = traceback.format_exc()
                self.errors.append((ep.name, source, tb))
                warnings.warn(f"osengine: skipping broken {self.kind} plugin {ep.name!r} from {source}:\n{tb}",
                              RuntimeWarning, stacklevel=2)

    def refresh(self) -> None:
        """Forget what was discovered (plugins registered at run time included) and look again, e.g. after
        `pip install` of a plugin package in a running session."""
        self._plugins.clear()
        self.errors.clear()
        self._discovered = False

    def infos(self) -> list:
        self.discover()
        return list(self._plugins.values())

    def names(self) -> list:
        return sorted(i.name for i in self.infos())

    def get(self, name: str) -> type:
        self.discover()
        if name not in self._plugins:
            broken = [n for n, _, _ in self.errors if n == name]
            hint = " (it is installed but failed to load; see `osengine plugins`)" if broken else ""
            raise PluginError(f"unknown {self.kind} {name!r}{hint}; available: {', '.join(self.names()) or 'none'}. "
                              f"Writing your own: {PLUGIN_GUIDE}")
        return self._plugins[name].obj


def _source_checkout_entry_points(group: str) -> list:
    """Running from a source checkout (osengine not installed): read the built-in plugins' entry points from the
    checkout's pyproject.toml, so the same declarations serve both cases."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.is_file():
        return []
    import tomllib

    table = tomllib.loads(pyproject.read_text()).get("project", {}).get("entry-points", {}).get(group, {})
    plugins_dir = str(pyproject.parent / "plugins")
    if table and plugins_dir not in sys.path:
        sys.path.append(plugins_dir)
    return [(metadata.EntryPoint(name=n, value=v, group=group), "osengine source checkout (pyproject.toml)")
            for n, v in table.items()]


strategies = Registry("strategy", STRATEGY_GROUP, Strategy)
architectures = Registry("architecture", ARCHITECTURE_GROUP, Architecture)


def register_strategy(cls: type) -> type:
    """Class decorator: register a strategy without an entry point (scripts, notebooks, tests)."""
    return strategies.register(cls)


def register_architecture(cls: type) -> type:
    """Class decorator: register an architecture without an entry point."""
    return architectures.register(cls)


def make_strategy(name: str, options: Optional[dict] = None) -> Strategy:
    cls = strategies.get(name)
    try:
        return cls(**(options or {}))
    except TypeError as e:
        raise PluginError(f"strategy {name!r} rejected its options {options or {}}: {e}") from None


def resolve_architecture(model: nn.Module) -> Architecture:
    for info in architectures.infos():
        arch = info.obj()
        if arch.matches(model):
            return arch
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    supported = sorted({t for i in architectures.infos() for t in i.obj.model_types})
    raise PluginError(f"unsupported model type {model_type!r}; supported: {', '.join(supported) or 'none'}. "
                      f"Add an architecture plugin: see {PLUGIN_GUIDE}")


def grid(hi: float, lo: float, steps: int) -> list:
    """Candidate thresholds from hi down to lo (OS+'s t grid)."""
    if steps <= 1 or hi <= lo:
        return [max(hi, lo)]
    return [hi - (hi - lo) * i / (steps - 1) for i in range(steps)]


__all__ = [
    "Architecture", "AttentionOutput", "GatedOutput", "Inspector", "LinearOutput", "Migration", "MigrationSite",
    "PluginError", "SiteData", "Strategy", "apply_migration", "architectures", "grid", "make_strategy",
    "register_architecture", "register_strategy", "resolve_architecture", "strategies",
]
