"""Hadamard matrices (quant/hadamard.py): every constructed order is orthogonal, the supported sizes are the ones
documented, and the online transform equals the dense product."""
import math

import pytest

torch = pytest.importorskip("torch")

from osengine.quant import hadamard  # noqa: E402
from osengine.quant.hadamard import (  # noqa: E402
    MAX_BASE_ORDER,
    HadamardError,
    base_matrix,
    check_supported,
    decomposition,
    hadamard_matrix,
    hadamard_transform,
    random_hadamard,
)


def test_every_base_order_is_a_hadamard_matrix():
    orders = sorted(hadamard._base_constructions())
    assert {12, 20, 28, 36, 44, 60, 76} <= set(orders)
    for m in orders:
        h = base_matrix(m).long()
        assert set(h.unique().tolist()) == {-1, 1}
        assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.long)), m


@pytest.mark.parametrize("n, expected", [
    (1, (1, 1)), (2, (1, 2)), (64, (1, 64)), (576, (36, 16)), (1536, (12, 128)), (896, (28, 32)),
    (4864, (76, 64)), (5632, (44, 128)), (14336, (28, 512)), (24, (12, 2)), (4096, (1, 4096)),
])
def test_model_widths_decompose_with_the_largest_power_of_two(n, expected):
    assert decomposition(n) == expected


@pytest.mark.parametrize("n", [0, -4, 3, 6, 10, 18, 11008, 43 * 1024, 1.5, True])
def test_unsupported_orders_are_a_clear_error(n):
    assert decomposition(n) is None
    with pytest.raises(HadamardError, match=r"order .* supported orders are m \* 2\^k"):
        check_supported(n, "the test's width")


def test_the_largest_paley_order_is_bounded():
    assert max(hadamard._base_constructions()) <= MAX_BASE_ORDER


@pytest.mark.parametrize("n", [1, 2, 12, 16, 20, 28, 36, 48, 576, 1536])
def test_normalized_matrix_is_orthogonal(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    r = random_hadamard(n, seed=5)
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_random_hadamard_depends_on_the_seed_only():
    assert torch.equal(random_hadamard(48, 1), random_hadamard(48, 1))
    assert not torch.equal(random_hadamard(48, 1), random_hadamard(48, 2))


@pytest.mark.parametrize("n", [1, 2, 4, 12, 24, 36, 64, 576, 1536])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_transform_equals_the_dense_product(n, rows):
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n + rows)) * 10
    y = hadamard_transform(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    expected = x.double() @ hadamard_matrix(n)
    assert torch.allclose(y.double(), expected, atol=1e-5 * math.sqrt(n) * 10, rtol=0)


def test_transform_keeps_leading_dimensions_and_spreads_an_outlier():
    x = torch.zeros(2, 3, 1536)
    x[..., 7] = 1000.0
    y = hadamard_transform(x)
    assert y.shape == x.shape
    assert torch.allclose(y.abs(), torch.full_like(y, 1000.0 / math.sqrt(1536)), rtol=1e-5)


def test_transform_is_its_own_inverse_for_symmetric_matrices():
    x = torch.randn(5, 64)
    assert torch.allclose(hadamard_transform(hadamard_transform(x)), x, atol=1e-5)
