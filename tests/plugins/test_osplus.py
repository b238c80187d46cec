"""The osplus strategy's grid search on its own (a stand-in for SiteData)."""
import pytest

torch = pytest.importorskip("torch")

from osengine.plugin_api import Reduction
from osengine_plugins.strategies.osplus import OSPlus


class FakeSite:
    """Channel ranges and a quadratic error around a known best threshold."""

    def __init__(self, lo, hi, best_t, search_min=1.0):
        self.lo, self.hi, self.best_t, self.scale_search_min = lo, hi, best_t, search_min
        self.shift_foldable = True
        self.calls = 0
        self.reduction = Reduction()   # one process, as SiteData's default

    def channel_min(self):
        return self.lo

    def channel_max(self):
        return self.hi

    def error(self, shift=None, scale=None, clip=None):
        self.calls += 1
        return 0.0 if clip is None else (clip - self.best_t) ** 2


def test_refined_grid_finds_the_best_threshold():
    site = FakeSite(torch.tensor([-1.0, -300.0, 2.0]), torch.tensor([1.0, 100.0, 4.0]), best_t=37.3)
    m = OSPlus(max_grid_steps=20).migrate(site)
    assert abs(m.info["t"] - 37.3) < 1.0 and m.info["grid_points"] == 40
    assert torch.allclose(m.shift, torch.tensor([0.0, -100.0, 3.0]))
    assert float(m.scale.max()) == pytest.approx(200.0 / m.info["t"])


def test_activations_below_the_grid_give_one_candidate_not_a_crash():
    # every channel narrower than the architecture's lower end of the grid (e.g. all-padding calibration text)
    site = FakeSite(torch.tensor([-0.01, -0.02]), torch.tensor([0.01, 0.03]), best_t=0.5, search_min=1.0)
    m = OSPlus(max_grid_steps=20).migrate(site)
    assert m.info["grid_points"] == 1 and torch.all(m.scale == 1.0)


class TokenSite(FakeSite):
    """FakeSite with real per-token inputs (two batches), for the quantile shift."""

    def __init__(self, x, best_t):
        super().__init__(x.amin(0), x.amax(0), best_t)
        self.inputs = [x[: len(x) // 2], x[len(x) // 2:]]
        self.shift_foldable = False

    def tokens(self, i):
        return self.inputs[i]


def test_quantile_shift_ignores_a_few_massive_tokens():
    # Channel 0 is centred on 5 except on 3 attention-sink-like tokens that reach 3000: the paper's midrange shifts
    # every token by ~1500; the 1% quantiles keep the shift at the bulk's centre.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1000, 4, generator=g) * 2 - 1
    x[:, 0] += 5.0
    x[[0, 400, 800], 0] = 3000.0
    paper = OSPlus(shift="runtime", max_grid_steps=10).migrate(TokenSite(x, best_t=1.0))
    robust = OSPlus(shift="runtime", shift_quantile=0.01, max_grid_steps=10).migrate(TokenSite(x, best_t=1.0))
    assert paper.runtime_shift and robust.runtime_shift
    assert float(paper.shift[0]) > 1000
    assert abs(float(robust.shift[0]) - 5.0) < 0.1 and float(robust.shift[1:].abs().max()) < 0.1


@pytest.mark.parametrize("bad", [-0.1, 0.5, "0.01", True])
def test_shift_quantile_is_validated(bad):
    from osengine.plugin_api import PluginError

    with pytest.raises(PluginError, match="shift_quantile"):
        OSPlus(shift_quantile=bad)


def test_shift_sites_limits_the_shift():
    x = torch.rand(200, 4) + torch.tensor([3.0, -2.0, 0.0, 1.0])

    class Named(TokenSite):
        def __init__(self, name):
            super().__init__(x, best_t=1.0)
            self.site = type("Site", (), {"name": name, "producer": "p"})()

    strategy = OSPlus(shift="runtime", shift_sites="attn, mlp", max_grid_steps=10)
    assert strategy.shift_sites == ("attn", "mlp")
    assert strategy.migrate(Named("mlp")).shift is not None
    down = strategy.migrate(Named("down"))
    assert down.shift is None and not down.runtime_shift


@pytest.mark.parametrize("bad", ["", [], [1], 3])
def test_shift_sites_is_validated(bad):
    from osengine.plugin_api import PluginError

    with pytest.raises(PluginError, match="shift_sites"):
        OSPlus(shift_sites=bad)
