"""The reference's own arithmetic: fma_f32 is the correctly rounded fmaf, checked against exact
rational arithmetic (including sums that land exactly halfway between two float32 values)."""

from fractions import Fraction

import numpy as np

from reference import bf16_to_f32, f32_to_bf16, fma_f32

F32 = np.float32


def exact_fma(w, x, acc):
    """fmaf by exact rationals, rounded to nearest float32, ties to even."""
    exact = Fraction(float(w)) * Fraction(float(x)) + Fraction(float(acc))
    guess = F32(float(exact))
    candidates = [np.nextafter(guess, F32(-np.inf)), guess, np.nextafter(guess, F32(np.inf))]
    best = min(candidates, key=lambda c: (abs(Fraction(float(c)) - exact), int(np.array(c).view(np.uint32)) & 1))
    return best


def test_fma_matches_exact_rounding_on_random_values():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(4000) * 4).astype(F32)
    x = (rng.standard_normal(4000) * 4).astype(F32)
    acc = (rng.standard_normal(4000) * 8).astype(F32)
    got = fma_f32(w, x, acc)
    for i in range(len(w)):
        assert got[i] == exact_fma(w[i], x[i], acc[i]), (w[i], x[i], acc[i])


def test_fma_breaks_halfway_cases_toward_the_exact_sum():
    # acc = 1 + 2^-23 (odd last bit), w*x = 2^-24 - 2^-64: in float64 the sum rounds to exactly
    # halfway between 1 + 2^-23 and 1 + 2^-22 (ties-to-even would pick the latter), while the
    # exact sum lies just below halfway.
    acc = F32(1 + 2.0**-23)
    w = F32(2.0**-24 * (1 + 2.0**-20))
    x = F32(1 - 2.0**-20)
    naive = F32(float(w) * float(x) + float(acc))
    assert naive == F32(1 + 2.0**-22)
    assert fma_f32(w, x, acc) == exact_fma(w, x, acc) == F32(1 + 2.0**-23)
    assert fma_f32(-w, x, -acc) == F32(-(1 + 2.0**-23))
    # Exact ties round to even.
    assert fma_f32(F32(2.0**-24), F32(1), F32(1)) == F32(1)
    assert fma_f32(F32(2.0**-24), F32(1), F32(1 + 2.0**-23)) == F32(1 + 2.0**-22)


def test_bf16_rounds_to_nearest_even():
    values = np.array([1.0, 1 + 2.0**-8, 1 + 3 * 2.0**-8, -2.5, np.inf], dtype=F32)
    bits = f32_to_bf16(values)
    assert list(bf16_to_f32(bits)) == [1.0, 1.0, 1 + 2.0**-6, -2.5, np.inf]
    assert np.isnan(bf16_to_f32(f32_to_bf16(np.array([np.nan], dtype=F32))))[0]
