"""Hadamard matrices of the orders transformer widths need, and the online transform the engine fuses into its
quantize kernel.

An order n is supported when n = m * 2^k with m = 1 or m a Paley order (below 256):
    Paley I   m = q + 1       for a prime q = 3 (mod 4)      (12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, ...)
    Paley II  m = 2 (q + 1)   for a prime q = 1 (mod 4)      (12, 28, 36, 60, 76, 84, 108, ...)
and H_n = H_m (Kronecker) H_{2^k}, H_{2^k} Sylvester's. Of the possible decompositions the one with the largest 2^k
is used (fewest dense operations). SmolLM2: 576 = 36 * 16, 1536 = 12 * 128; LLaMA-3 14336 = 28 * 512; Qwen2-0.5B
896 = 28 * 32, 4864 = 76 * 64; TinyLlama 5632 = 44 * 128. LLaMA-2's 11008 = 172 * 64 is not (172 has a Hadamard
matrix, but not a Paley one).

The online transform y = x H_n / sqrt(n) of a row x (index i = a * 2^k + b) is computed in float32 in this order,
which every engine backend follows, so that all of them produce the same floats:
    1. per a, Sylvester butterflies on x[a, :]: for h = 1, 2, 4, ..., 2^(k-1), each pair (j, j + h) of each block
       of 2h becomes (x_j + x_{j+h}, x_j - x_{j+h})
    2. per output a', y[a', :] = sum over a = 0, 1, ..., m-1 in that order of H_m[a, a'] * x[a, :] (signs exact:
       the first term is +-x[0, :], then each term is added or subtracted)
    3. y *= float32(1 / sqrt(n))
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch

MAX_BASE_ORDER = 256


class HadamardError(ValueError):
    """An order for which no Hadamard matrix is constructed here."""


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> list:
    """Q[i][j] = chi(j - i) for the quadratic character chi of GF(q), q prime."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if r in squares else -1 for r in range(1, q)]
    return [[chi[(j - i) % q] for j in range(q)] for i in range(q)]


def _paley1(q: int) -> list:
    """Order q + 1 (q prime, q = 3 mod 4): H = I + [[0, 1^T], [-1, Q]]."""
    n = q + 1
    jac = _jacobsthal(q)
    h = [[0] * n for _ in range(n)]
    for j in range(n):
        h[0][j] = 1
    for i in range(1, n):
        h[i][0] = -1
        for j in range(1, n):
            h[i][j] = jac[i - 1][j - 1] + (1 if i == j else 0)
    return h


def _paley2(q: int) -> list:
    """Order 2 (q + 1) (q prime, q = 1 mod 4): C = [[0, 1^T], [1, Q]] (symmetric), each 0 of C replaced by
    [[1, -1], [-1, -1]] and each +-1 by +-[[1, 1], [1, -1]]."""
    jac = _jacobsthal(q)
    c = [[0] + [1] * q] + [[1] + jac[i] for i in range(q)]
    size = q + 1
    h = [[0] * (2 * size) for _ in range(2 * size)]
    for i in range(size):
        for j in range(size):
            block = [[1, -1], [-1, -1]] if c[i][j] == 0 else [[c[i][j], c[i][j]], [c[i][j], -c[i][j]]]
            for di in range(2):
                for dj in range(2):
                    h[2 * i + di][2 * j + dj] = block[di][dj]
    return h


@lru_cache(maxsize=None)
def _base_constructions() -> dict:
    """Paley order -> (construction name, q), the Paley I construction where both exist."""
    out = {}
    for q in range(3, MAX_BASE_ORDER):
        if not _is_prime(q):
            continue
        if q % 4 == 1 and 2 * (q + 1) <= MAX_BASE_ORDER:
            out.setdefault(2 * (q + 1), ("paley2", q))
        if q % 4 == 3 and q + 1 <= MAX_BASE_ORDER:
            out[q + 1] = ("paley1", q)
    return out


def decomposition(n: int) -> Optional[tuple]:
    """(m, 2^k) with n = m * 2^k, m = 1 or a Paley order, 2^k as large as possible; None when there is none."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    bases = _base_constructions()
    power = n & -n   # the largest power of two dividing n
    while power >= 1:
        m = n // power
        if m == 1 or m in bases:
            return m, power
        power //= 2
    return None


def is_supported(n: int) -> bool:
    return decomposition(n) is not None


def check_supported(n: int, what: str) -> tuple:
    """(m, 2^k) of order n, or a HadamardError naming `what` and the supported forms."""
    found = decomposition(n)
    if found is None:
        examples = ", ".join(str(m) for m in sorted(_base_constructions())[:12])
        raise HadamardError(f"{what}: no Hadamard matrix of order {n} is constructed here; supported orders are "
                            f"m * 2^k with m = 1 or a Paley order below {MAX_BASE_ORDER} ({examples}, ...)")
    return found


@lru_cache(maxsize=None)
def base_matrix(m: int) -> torch.Tensor:
    """The +-1 Hadamard matrix H_m of a base order (1 or a Paley order), int8 [m, m]."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.int8)
    kind, q = _base_constructions()[m]
    rows = _paley1(q) if kind == "paley1" else _paley2(q)
    return torch.tensor(rows, dtype=torch.int8)


def sylvester(p: int) -> torch.Tensor:
    """Sylvester's +-1 Hadamard matrix of order p (a power of two), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, normalized: bool = True) -> torch.Tensor:
    """H_n = H_m (Kronecker) H_{2^k}, float64 [n, n]; divided by sqrt(n) when normalized (then orthogonal)."""
    m, p = check_supported(n, "hadamard_matrix")
    h = torch.kron(base_matrix(m).double(), sylvester(p))
    return h / math.sqrt(n) if normalized else h


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """A randomized orthogonal Hadamard rotation diag(signs) H_n / sqrt(n), the signs drawn from `seed` (QuaRot's
    offline rotation of the residual stream), float64 [n, n]."""
    generator = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).double() * 2 - 1
    return signs[:, None] * hadamard_matrix(n)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """y = x H_n / sqrt(n) over the last dimension of x, in float32, in the operation order every engine backend
    follows (module docstring); returns float32."""
    n = x.shape[-1]
    m, p = check_supported(n, "hadamard_transform (the last dimension of x)")
    lead = x.shape[:-1]
    v = x.float().reshape(-1, m, p)
    h = 1
    while h < p:
        pairs = v.reshape(v.shape[0], m, p // (2 * h), 2, h)
        low, high = pairs[..., 0, :], pairs[..., 1, :]
        v = torch.stack([low + high, low - high], dim=3).reshape(v.shape[0], m, p)
        h *= 2
    if m > 1:
        signs = base_matrix(m).to(torch.float32)          # signs[a, a']
        acc = v[:, 0:1, :] * signs[0][None, :, None]      # exact: +-x
        for a in range(1, m):
            term = v[:, a:a + 1, :]
            plus = (signs[a] > 0)[None, :, None]
            acc = torch.where(plus, acc + term, acc - term)
        v = acc
    scale = torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32)
    return (v * scale).reshape(*lead, n)
