"""The plugin contract: what strategy and architecture plugins subclass, declare and call.

    Strategy       decides the shift z and scale s of each migration site, from the site's calibration data (SiteData,
                   whose `error` is the search objective: the inspected output's error after a candidate transform)
    Architecture   describes a model family as data: where its blocks are, its migration sites (which linears share
                   an input, what produces it, what the search inspects), and the facts the engine model and the
                   exports read (a foldable RMSNorm, a gated MLP, config flags that add biases)

Plugins are found by the registry (osengine.plugins.registry); `osengine.plugin_api` re-exports both for plugin
authors. The built-in plugins (package osengine_plugins) use nothing else. See docs/plugins.md.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.recipes import Recipe
from ..quant.spec import QuantSpec, quantize_dynamic, quantize_weight, quantize_with_range


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


class Reduction:
    """How the statistics of one calibration combine over the processes that share its samples (torch.distributed:
    osengine.calibrate.distributed). This base class is one process: every reduction is the identity. Reductions
    are collective: every process calls them in the same order."""
    world_size = 1
    rank = 0

    def min(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t


@dataclass
class SiteData:
    """Calibration data of one site, handed to Strategy.migrate.

    inputs         FP inputs X of the consumers, one [batch, tokens, channels] tensor per calibration batch
                   (they came through the already-quantized earlier blocks)
    search_inputs  the first few batches, on which `error` evaluates candidates
    calls          the captured calls of site.inspect.module for the search batches (attention sites)
    token_masks    per input batch, a [batch, tokens] boolean mask of the real tokens, or None (no padding);
                   padding tokens (and a full-precision prefix) count neither in the channel ranges nor in `error`
    fp_prefix      the number of leading tokens of every sequence that run in full precision (an outlier-token
                   prefix): `error` leaves them unquantized
    reduction      with several processes (torch.distributed) each holds a slice of the calibration batches:
                   channel_min, channel_max and error reduce over all of them (collective calls: every process
                   makes the same ones); `inputs` and `tokens` are this process's slice only, so a strategy that
                   computes statistics of its own declares `distributed = False` (the default for plugins)
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
    fp_prefix: int = 0      # leading tokens of every sequence kept in full precision (not quantized in error())
    reduction: Reduction = field(default_factory=Reduction)
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
        """Per channel, the least value over the real calibration tokens (of every process)."""
        return self.reduction.min(torch.stack([self.tokens(i).amin(0) for i in range(len(self.inputs))]).amin(0))

    def channel_max(self) -> torch.Tensor:
        """Per channel, the greatest value over the real calibration tokens (of every process)."""
        return self.reduction.max(torch.stack([self.tokens(i).amax(0) for i in range(len(self.inputs))]).amax(0))

    def weights(self) -> list:
        """The consumers' current (weight, bias), fp32."""
        out = []
        for n in self.site.consumers:
            m = self.model.get_submodule(n)
            out.append((m.weight.detach().float(), None if m.bias is None else m.bias.detach().float()))
        return out

    @property
    def _dtype(self) -> torch.dtype:
        """The consumers' dtype, which the inspected module computes in (weights() are fp32 for statistics)."""
        return self.model.get_submodule(self.site.consumers[0]).weight.dtype

    def reference(self) -> list:
        if self._reference is None:
            w = [(w.to(self._dtype), None if b is None else b.to(self._dtype)) for w, b in self.weights()]
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
            weights.append((w_new.to(self._dtype), None if b_new is None else b_new.to(self._dtype)))
        total, tokens = 0.0, 0
        for i, (x, call, ref) in enumerate(zip(self.search_inputs, self.calls, self.reference())):
            xs = x.float()
            if shift is not None:
                xs = xs - shift
            if scale is not None:
                xs = xs / scale
            transformed = xs
            if quantize:
                if clip is not None and self.act_spec.granularity == "per-tensor":
                    xs = quantize_with_range(xs, -clip, clip, self.act_spec)
                elif self.act_spec.dynamic:
                    xs = quantize_dynamic(xs, self.act_spec)
                else:  # static per-tensor without a given clip: the MinMax range of this batch's real tokens
                    real = xs if self._mask(i) is None else xs[self._mask(i).to(xs.device)]
                    xs = quantize_with_range(xs, real.min().item(), real.max().item(), self.act_spec)
                if self.fp_prefix and xs.dim() == 3:  # the full-precision prefix stays as it is
                    xs = torch.cat([transformed[:, :self.fp_prefix], xs[:, self.fp_prefix:]], dim=1)
            out = self.site.inspect(self.model, self.site, xs.to(x.dtype), weights, call)
            err = (out.float() - ref.float()).pow(2).sum(-1)
            mask = self._mask(i)
            if mask is not None:
                err = err[mask.to(err.device)]
            total += err.sum().item()
            tokens += err.numel()
        if self.reduction.world_size > 1:
            total, tokens = self.reduction.sum(torch.tensor([total, float(tokens)], dtype=torch.float64)).tolist()
        return total / max(tokens, 1)


# ----------------------------------------------------------------------------------------------------------------
# Plugin base classes
# ----------------------------------------------------------------------------------------------------------------


class Strategy(ABC):
    """Calibration strategy. Subclasses set `name` and `description`, take their options as keyword arguments of
    __init__, and implement `migrate`. Returning None leaves the site untouched (plain MinMax quantization)."""
    name: str = ""
    description: str = ""
    # True when migrate() reads the calibration data only through SiteData's channel_min, channel_max and error
    # (and the weights), which reduce over processes: then the strategy calibrates with torch.distributed.
    distributed: bool = False
    # False for a strategy that only transforms the whole model before calibration (prepare) and never migrates a
    # site: it can then be composed with one that does ("rotate+osplus").
    migrates: bool = True

    @abstractmethod
    def migrate(self, data: SiteData) -> Optional[Migration]:
        ...

    def prepare(self, model: nn.Module, arch: "Architecture") -> Optional[dict]:
        """A transformation of the whole floating-point model before its blocks are calibrated (exact in floating
        point, e.g. a rotation of the residual stream), or nothing (the default). Returns a record for the report
        and the saved folder (JSON-serializable), or None. Must be deterministic given the strategy's options:
        several processes and resumed runs each apply it again."""
        return None

    def adapt_recipe(self, recipe: Recipe, model: nn.Module, arch: "Architecture") -> Recipe:
        """The recipe this strategy's method calibrates with, given the one the user chose: a method that prescribes
        an observer or which linears stay per-token dynamic says so here (dataclasses.replace on the recipe). Called
        once before calibration; the returned recipe is the one reported and saved. Default: unchanged."""
        return recipe


@dataclass(frozen=True)
class GatedMLP:
    """An MLP computing down(act(gate(x)) * up(x)), LLaMA's. Names are relative to a block: `module` is the MLP,
    `gate` / `up` / `down` its linears, `activation` the MLP's attribute holding act. The engine model fuses the
    activation into down's input quantization when act is SiLU."""
    module: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    activation: str = "act_fn"


@dataclass(frozen=True)
class NormReaders:
    """A norm of the residual stream and the linears that read its output (names relative to a block)."""
    norm: str
    readers: tuple


@dataclass(frozen=True)
class RotationLayout:
    """Where a model family's residual stream is read and written, for a rotation strategy (QuaRot's R1 = a
    randomized Hadamard Q): the stream X becomes X Q everywhere, exact in floating point once the norms carry no
    per-channel weight. Names of the whole model:
        embeddings    modules whose weight rows are added into the stream (token and learned position embeddings)
        final_norm    the norm after the last block; lm_head reads its output (None for models without a head)
    Names relative to a block:
        norms         each norm with the linears reading it: its weight (and bias) are folded into them
        writers       linears whose output is added into the stream (attention output projection, MLP down)
        value_output  (value projection, output projection): a per-head rotation of the values is folded into both
        online        linears whose input is rotated at run time (x H / sqrt(K) fused into the quantization; their
                      weight absorbs the inverse): the MLP down projection
        online_attention  the attention output projection, also rotated online on request (QuaRot's rotation across
                      heads; its input is the heads' outputs side by side)
    centered       LayerNorm models: the mean subtraction is folded first (embeddings and writers centred so the
                   stream has zero mean), after which each LayerNorm is an RMSNorm and is replaced by one."""
    embeddings: tuple
    final_norm: Optional[str]
    lm_head: Optional[str]
    norms: tuple
    writers: tuple
    value_output: Optional[tuple] = None
    online: tuple = ()
    online_attention: Optional[str] = None
    centered: bool = False


class Architecture(ABC):
    """Model architecture, described mostly as data. Subclasses set `name`, `model_types` (Hugging Face
    config.model_type values) and `layers` (where the blocks are), and implement `sites`. Optional facts:

    rmsnorm_eps_attribute  the RMSNorm modules' epsilon attribute, when they compute weight * (x * rsqrt(mean(x^2)
                           + eps)) in fp32 as LLaMA's do: the engine then folds an RMSNorm site producer into the
                           activation quantization of its readers
    gated_mlp              a GatedMLP: the engine folds act(gate) * up into down's input quantization
    bias_flags             config flags that give a whole group of linears a bias (LLaMA's attention_bias, mlp_bias);
                           an export whose folded model has a bias the config lacks sets them
    runtime_attention      the model's RoPE and attention are the native runtime's (rotate-half RoPE in
                           `model.rotary_emb`, causal softmax attention with GQA, transformers' attention interface):
                           the CPU engine model and the simulation then compute them with the runtime's kernels
                           (runtime.attention)
    Linears that read one site's input (site.consumers, e.g. q/k/v, gate/up) are what the engine model fuses into
    one GEMM and what an export marks as one fused projection.
    """
    name: str = ""
    description: str = ""
    model_types: tuple = ()
    layers: tuple = ()                 # candidate paths of the ModuleList of blocks, e.g. ("model.layers", "layers")
    scale_search_min: float = 1.0      # lower end of OS+'s t grid (paper: 1.0 OPT/BLOOM, 0.1 LLaMA)
    smoothquant_alpha: float = 0.5
    rmsnorm_eps_attribute: Optional[str] = None
    gated_mlp: Optional[GatedMLP] = None
    bias_flags: tuple = ()
    runtime_attention: bool = False

    def matches(self, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in self.model_types

    def layer_list(self, model: nn.Module) -> tuple:
        """(path, ModuleList) of the blocks: the first of `layers` that the model has."""
        if not self.layers:
            raise PluginError(f"architecture {self.name}: declare `layers` (where the blocks are) or override blocks()")
        for path in self.layers:
            try:
                return path, model.get_submodule(path)
            except AttributeError:
                continue
        raise PluginError(f"architecture {self.name}: none of {list(self.layers)} found in {type(model).__name__}")

    def blocks(self, model: nn.Module) -> list:
        """Full names of the transformer blocks, in execution order."""
        path, layers = self.layer_list(model)
        return [f"{path}.{i}" for i in range(len(layers))]

    def block(self, model: nn.Module, index: int) -> str:
        """Full name of block `index`."""
        return f"{self.layer_list(model)[0]}.{index}"

    @abstractmethod
    def sites(self, model: nn.Module, index: int) -> list:
        """MigrationSites of block `index`, in execution order."""

    def attention_modules(self, model: nn.Module) -> list:
        """Attention modules whose BMM inputs a recipe may quantize (through transformers' AttentionInterface).
        An empty list means the architecture does not support BMM-input quantization."""
        return []

    def rotation_layout(self, model: nn.Module) -> Optional[RotationLayout]:
        """Where the residual stream is read and written (a RotationLayout), for rotation strategies; None when the
        architecture does not describe it (rotations are then refused)."""
        return None

    def shared_input_groups(self, model: nn.Module) -> list:
        """Every group of two or more linears (full names) that read one tensor, over all blocks: the consumers of
        each migration site that has several."""
        return [list(s.consumers) for i in range(len(self.blocks(model))) for s in self.sites(model, i)
                if len(s.consumers) > 1]


def grid(hi: float, lo: float, steps: int) -> list:
    """Candidate thresholds from hi down to lo (OS+'s t grid)."""
    if steps <= 1 or hi <= lo:
        return [max(hi, lo)]
    return [hi - (hi - lo) * i / (steps - 1) for i in range(steps)]


__all__ = [
    "Architecture", "AttentionOutput", "GatedMLP", "GatedOutput", "Inspector", "LinearOutput", "Migration",
    "MigrationSite", "NormReaders", "PluginError", "RotationLayout", "SiteData", "Strategy", "grid",
]
