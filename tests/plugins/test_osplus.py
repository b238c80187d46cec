"""The osplus strategy's grid search on its own (a stand-in for SiteData)."""
import pytest

torch = pytest.importorskip("torch")

from osengine_plugins.strategies.osplus import OSPlus


class FakeSite:
    """Channel ranges and a quadratic error around a known best threshold."""

    def __init__(self, lo, hi, best_t, search_min=1.0):
        self.lo, self.hi, self.best_t, self.scale_search_min = lo, hi, best_t, search_min
        self.shift_foldable = True
        self.calls = 0

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
