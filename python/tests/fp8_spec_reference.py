"""An independent NumPy reference of FP8 block quantisation, written from the specification alone
(docs/fp8.md and the project's issue), sharing no code with the library:

- e4m3 (OCP, torch ``float8_e4m3fn``): the 256 codes are enumerated from the format's definition
  and a float32 value goes to the nearest finite code, ties to the even code, saturating at
  ±448 (``satfinite``: ±inf too); a zero result keeps the sign; NaN gives 0x7F (docs/fp8.md: one
  NaN code whatever the sign).
- Per block of ``block`` elements, in float32: amax = max |x| with NaN ignored, clamped below at
  1e-4f (and, docs/fp8.md step 2, above at the largest float, so a block holding ±inf is scaled
  as if its amax were FLT_MAX: the issue's text leaves that case undefined);
  float32 mode: scale = amax / 448, multiplier = 448 / amax (two float32 divisions);
  power-of-two modes: e = ceil(log2(q)) for the float32 quotient q = amax / 448, computed
  exactly (here with math.frexp of q), scale = 2^e stored as the byte e + 127, multiplier 2^-e;
  each element is e4m3(float32(x × multiplier)).
- Scale words per row: float32 scales, or the exponent bytes packed 4 to an int32, block j in
  byte j % 4 of word j / 4, least significant first, unused bytes zero.
"""

import math

import numpy as np

F32 = np.float32
MODES = {"float32": (128, False), "ue8m0": (128, True), "e8m0": (32, True)}
MIN_AMAX = F32(1e-4)
FLT_MAX = F32(np.finfo(F32).max)


def e4m3_values():
    """The value of each of the 256 codes (float64; NaN for 0x7F and 0xFF), from the definition:
    sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal, m / 8 × 2^-6."""
    values = np.empty(256)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exponent, mantissa = (code >> 3) & 0xF, code & 0x7
        if exponent == 0xF and mantissa == 0x7:
            values[code] = math.nan
        elif exponent == 0:
            values[code] = sign * mantissa / 8 * 2.0 ** -6
        else:
            values[code] = sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)
    return values


VALUES = e4m3_values()
POSITIVE = VALUES[:0x7F]   # codes 0x00 ... 0x7E, strictly increasing, 0 ... 448
assert np.all(np.diff(POSITIVE) > 0) and POSITIVE[-1] == 448.0


def e4m3_encode(x):
    """float32 array -> e4m3 codes (uint8): nearest, ties to the even code, satfinite."""
    x = np.asarray(x, dtype=F32)
    a = np.abs(x).astype(np.float64)
    finite_a = np.where(np.isnan(a) | (a > 448.0), 448.0, a)
    hi = np.clip(np.searchsorted(POSITIVE, finite_a, side="left"), 1, 0x7E)   # POSITIVE[hi-1] < a <= POSITIVE[hi]
    lo = hi - 1
    twice, bounds = 2.0 * finite_a, POSITIVE[lo] + POSITIVE[hi]   # both exact in float64
    code = np.where(twice < bounds, lo, np.where(twice > bounds, hi, np.where(lo % 2 == 0, lo, hi)))
    code = np.where(finite_a == 0.0, 0, code)
    code = code | np.where(np.signbit(x), 0x80, 0)
    return np.where(np.isnan(x), 0x7F, code).astype(np.uint8)


def block_scale(amax, pow2):
    """(scale, multiplier, exponent byte or None) of one block from its unclamped float32 amax."""
    amax = min(max(F32(amax), MIN_AMAX), FLT_MAX)
    if not pow2:
        return F32(amax / F32(448)), F32(F32(448) / amax), None
    quotient = F32(amax / F32(448))
    mantissa, exponent = math.frexp(float(quotient))   # quotient = mantissa × 2^exponent, 0.5 <= m < 1
    e = exponent - 1 if mantissa == 0.5 else exponent  # ceil(log2(quotient)), exact
    return F32(2.0 ** e), F32(2.0 ** -e), e + 127


def quantize_rows(rows, mode):
    """float32 [N, H] -> (codes uint8 [N, H], scale words [N, W] float32 or int32)."""
    block, pow2 = MODES[mode]
    rows = np.asarray(rows, dtype=F32)
    n, h = rows.shape
    assert h % block == 0
    blocks = h // block
    codes = np.empty((n, h), np.uint8)
    scales = np.zeros((n, blocks), F32)
    exponent_bytes = np.zeros((n, 4 * ((blocks + 3) // 4)), np.uint8)
    for i in range(n):
        for j in range(blocks):
            x = rows[i, j * block:(j + 1) * block]
            magnitudes = np.abs(x)
            amax = magnitudes[~np.isnan(magnitudes)].max(initial=F32(0))
            scale, multiplier, byte = block_scale(amax, pow2)
            codes[i, j * block:(j + 1) * block] = e4m3_encode(x * multiplier)   # float32 product, one rounding
            scales[i, j] = scale
            if byte is not None:
                exponent_bytes[i, j] = byte
    if not pow2:
        return codes, scales
    words = exponent_bytes.reshape(n, -1, 4).astype(np.uint32)
    packed = words[..., 0] | words[..., 1] << 8 | words[..., 2] << 16 | words[..., 3] << 24
    return codes, packed.view(np.int32)
