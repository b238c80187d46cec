"""Folding is an exact equivalence: outputs before quantization equal within 1e-5, for every architecture and site."""
import pytest
import torch

from osengine.plugin_api import Migration, PluginError, apply_migration, resolve_architecture
from osengine.quant.layers import wrap_linears

from tiny_models import ARCHS, make_model, model_output


def _fold_everything(model, mode):
    arch = resolve_architecture(model)
    g = torch.Generator().manual_seed(3)
    seen = []
    for i, block in enumerate(arch.blocks(model)):
        wrap_linears(model.get_submodule(block))
        for site in arch.sites(model, i):
            c = model.get_submodule(site.consumers[0]).in_features
            scale = (1 + 4 * torch.rand(c, generator=g)).double()
            shift = torch.randn(c, generator=g).double() * 3
            foldable = site.producer_kind == "layernorm"
            if mode == "scale":
                mig = Migration(scale=scale)
            elif mode == "shift" and foldable:
                mig = Migration(shift=shift, scale=scale)
            else:  # runtime shift: any producer
                mig = Migration(shift=shift, scale=scale, runtime_shift=True)
            apply_migration(model, site, mig)
            seen.append(site.name)
    return seen


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("mode", ["scale", "shift", "runtime"])
def test_fold_is_exact(kind, mode, tokens):
    model = make_model(kind).double()
    ref = model_output(model, tokens)
    seen = _fold_everything(model, mode)
    out = model_output(model, tokens)
    assert (out - ref).abs().max().item() < 1e-5, seen
    expected = {"llama": {"attn", "mlp", "down"}, "qwen2": {"attn", "mlp", "down"}, "opt": {"attn", "fc1"},
                "bloom": {"attn", "mlp"}, "bert": {"attn", "ffn"}}[kind]
    assert set(seen) == expected


def test_bloom_post_ln_residual_fold(tokens):
    model = make_model("bloom", apply_residual_connection_post_layernorm=True).double()
    for layer in model.transformer.h:
        layer.apply_residual_connection_post_layernorm = True
    ref = model_output(model, tokens)
    _fold_everything(model, "shift")
    assert (model_output(model, tokens) - ref).abs().max().item() < 1e-5


def test_shift_into_rmsnorm_is_refused():
    model = make_model("llama")
    arch = resolve_architecture(model)
    site = arch.sites(model, 0)[0]
    with pytest.raises(PluginError, match="runtime shift"):
        apply_migration(model, site, Migration(shift=torch.ones(64)))
