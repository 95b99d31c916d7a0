"""FP8 dispatch on the CPU backend (the oracle) against an independent reference written from the
specification (fp8_spec_reference.py; docs/fp8.md): every received e4m3 byte and scale word, bit
for bit, in every scale mode, element type and layout, for random rows and hand-made edge blocks
(zeros, -0, subnormals, the 1e-4 clamp, ±448 and beyond, ±inf, NaN, equal values, exact e4m3
midpoints after scaling); pass-through moves the caller's bytes unchanged; the error cases are
named and write nothing. The GPU kernels (ep_fp8.cuh) must give these same bits."""

import math

import numpy as np
import pytest

import expert_parallel as ep
from fp8_spec_reference import MODES, POSITIVE, VALUES, block_scale, e4m3_encode, quantize_rows
from reference import Reference, from_f32, random_routing, to_f32

F32 = np.float32
LAYOUTS = [("ll", "expert_major", 1), ("ll", "rank_major", 1), ("ht", "flat", 1), ("ht", "expert_major_padded", 4)]
# Rows whose blocks do not fill the last packed word (3 blocks of 128, 5 of 32).
HIDDEN = {"float32": 384, "ue8m0": 384, "e8m0": 160}
MIDPOINTS = ((POSITIVE[:-1] + POSITIVE[1:]) / 2).astype(F32)   # exact in float32


# -- the reference itself --------------------------------------------------------------------

def test_the_e4m3_table_is_the_ocp_format():
    assert VALUES[0x00] == 0 and VALUES[0x80] == 0 and math.copysign(1, VALUES[0x80]) == -1
    assert VALUES[0x01] == 2.0 ** -9 and VALUES[0x07] == 7 * 2.0 ** -9 and VALUES[0x08] == 2.0 ** -6
    assert VALUES[0x38] == 1 and VALUES[0x7E] == 448 and VALUES[0xFE] == -448
    assert np.isnan(VALUES[0x7F]) and np.isnan(VALUES[0xFF]) and np.isnan(VALUES).sum() == 2
    torch = pytest.importorskip("torch")
    theirs = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy().astype(np.float64)
    np.testing.assert_array_equal(theirs, VALUES)


def test_the_encoder_rounds_to_nearest_even_as_torch_does_in_range():
    """torch's cast is round-to-nearest-even but not satfinite (beyond 464 it gives NaN): compared
    where |x| <= 448 only."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    values = POSITIVE.astype(F32)
    x = np.concatenate([values, MIDPOINTS, np.nextafter(MIDPOINTS, F32(0)), np.nextafter(MIDPOINTS, F32(1000)),
                        rng.integers(0, 0x43E00001, 200_000, dtype=np.uint32).view(F32)])   # 0 ... 448, every exponent
    x = np.concatenate([x, -x])
    theirs = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(e4m3_encode(x), theirs)


@pytest.mark.parametrize("value, code", [
    (448, 0x7E), (449, 0x7E), (463.99, 0x7E), (464, 0x7E), (465, 0x7E), (480, 0x7E), (1e30, 0x7E), (math.inf, 0x7E),
    (-448, 0xFE), (-449, 0xFE), (-464, 0xFE), (-465, 0xFE), (-480, 0xFE), (-1e30, 0xFE), (-math.inf, 0xFE),
    (math.nan, 0x7F), (-math.nan, 0x7F), (0.0, 0x00), (-0.0, 0x80),
    (2.0 ** -10, 0x00), (-(2.0 ** -10), 0x80), (2.0 ** -10 * 1.0001, 0x01), (1e-45, 0x00), (-1e-45, 0x80),
    (7.5 * 2.0 ** -9, 0x08), (6.5 * 2.0 ** -9, 0x06), (1.0625, 0x38), (1.1875, 0x3A), (416 + 16, 0x7E), (400, 0x7C),
    (1.0625 * (1 + 2.0 ** -20), 0x39), (-3.0, 0xC4),
])
def test_the_encoder_on_hand_made_values(value, code):
    """Expected codes worked out by hand: satfinite (all of 448 ... inf give 0x7E), one NaN code,
    signed zeros, ties to the even code among subnormals and normals."""
    assert int(e4m3_encode(np.array([value], F32))[0]) == code, hex(int(e4m3_encode(np.array([value], F32))[0]))


def test_block_scales_on_hand_made_amaxes():
    zero, three = block_scale(F32(0), False), block_scale(F32(3), False)
    assert zero[0] == F32(F32(1e-4) / F32(448)) and zero[1] == F32(F32(448) / F32(1e-4))
    assert three[0] == F32(F32(3) / F32(448)) and three[2] is None
    assert block_scale(F32(0), True)[2] == 105 and block_scale(F32(1e-4), True)[2] == 105  # 1e-4/448 ≈ 2^-22.09
    assert block_scale(F32(3), True) == (F32(2.0 ** -7), F32(2.0 ** 7), 120)               # 3/448 rounds up to 2^-7
    assert block_scale(F32(448), True)[2] == 127 and block_scale(np.nextafter(F32(448), F32(1000)), True)[2] == 128
    assert block_scale(F32(224), True)[2] == 126 and block_scale(np.nextafter(F32(224), F32(0)), True)[2] == 126
    assert block_scale(F32(math.inf), True)[2] == 247 and block_scale(F32(math.inf), False)[0] == F32(np.finfo(F32).max / F32(448))
    # The exponent from the float32 quotient's bits agrees with frexp (the reference's way).
    rng = np.random.default_rng(1)
    for amax in np.concatenate([rng.integers(0x38D1B717, 0x7F800000, 20_000, dtype=np.uint32).view(F32), [F32(1e-4)]]):
        bits = int(F32(amax / F32(448)).view(np.uint32))
        assert block_scale(amax, True)[2] == (bits >> 23) + (1 if bits & 0x7FFFFF else 0)
    codes, words = quantize_rows(np.full((1, 128), 3.0, F32), "ue8m0")
    assert np.all(codes == 0x7C) and words.view(np.uint32)[0, 0] == 120
    codes, words = quantize_rows(np.full((1, 128), 3.0, F32), "float32")
    assert np.all(codes == 0x7E) and words[0, 0] == F32(F32(3) / F32(448))


# -- the rows ---------------------------------------------------------------------------------

def edge_patterns():
    """Blocks of 32 float32 values; each row is one pattern repeated (a block of 128 sees it 4
    times, so the same amax) or a mixture of patterns."""
    z = np.zeros(32, F32)
    patterns = [z, -z, np.where(np.arange(32) % 2, F32(-0.0), F32(0.0)),
                np.array([1e-45, -1e-45, 1e-40, -1e-38, 1.17e-38, -5e-39] + [0] * 26, F32),   # float32 subnormals
                np.array([6e-8, -1e-5, 3e-5, 6.1e-5, -6e-5] + [0] * 27, F32)]                 # f16 subnormals
    clamp = F32(1e-4)
    for amax in (clamp, np.nextafter(clamp, F32(0)), np.nextafter(clamp, F32(1)), F32(2e-4)):
        p = (np.linspace(-1, 1, 32) * amax).astype(F32)
        p[0] = amax
        patterns += [p, -p]
    patterns += [
        np.array([448, -448, 449, -449, 464, -464, 465, -465, 480, -480, 447, 463.99, 1, -1, 0.5] + [3] * 17, F32),
        np.array([1e30, -1e30, 1, -1, 1e25, 3e29] + [2] * 26, F32),
        np.array([np.inf, 1, -2, 3e38, -1e-3, 0, -0.0] + [5] * 25, F32),
        np.array([-np.inf, 1, -2, 1e10] + [5] * 28, F32),
        np.array([np.inf, -np.inf] * 16, F32),
        np.array([np.nan, 1, -2, 3, -np.nan] + [0.25] * 27, F32),
        np.full(32, np.nan, F32),
        np.array([np.nan, np.inf, -np.nan, 7] + [0] * 28, F32),
        np.array([np.finfo(F32).max, -np.finfo(F32).max] + [1] * 30, F32),
        # float32 mode: x × (448 / amax) rounds above 448 (0x445699e0) and below it (0x444b914c).
        np.array([858.4043, -858.4043] + [1] * 30, F32), np.array([814.27026, -814.27026] + [1] * 30, F32),
    ]
    patterns += [np.full(32, v, F32) for v in (3.0, -7.0, 1e-4, 448.0, 2.0 ** -20, 1.0, 5e-5, 65504.0, 3e38)]
    # Exact e4m3 midpoints after scaling: 448 × 2^k in the block makes the multiplier 2^-k in every mode.
    for k in (0, -20, 10, 60, -100):
        for sign in (1, -1):
            for start in range(0, 126, 31):
                p = np.zeros(32)
                chunk = MIDPOINTS[start:start + 31]
                p[0], p[1:1 + len(chunk)] = 448, sign * chunk.astype(np.float64)
                patterns.append((p * 2.0 ** k).astype(F32))
    # amax / 448 an exact power of two, and its float32 neighbours.
    for k in (-30, -1, 0, 1, 5, 100):
        for amax in (F32(448 * 2.0 ** k), np.nextafter(F32(448 * 2.0 ** k), F32(0)), np.nextafter(F32(448 * 2.0 ** k), F32(np.inf))):
            p = (np.linspace(-1, 1, 32) * amax).astype(F32)
            p[0] = amax
            patterns.append(p)
    return patterns


def edge_rows(hidden):
    patterns = edge_patterns()
    rng = np.random.default_rng(9)
    rows = [np.tile(p, hidden // 32) for p in patterns]
    rows += [np.concatenate([patterns[i] for i in rng.integers(0, len(patterns), hidden // 32)]) for _ in range(40)]
    return np.stack(rows).astype(F32)


def random_rows(rng, n, hidden):
    """Normal values with a random power-of-two size per 32, and some rows of random finite bits."""
    sizes = np.repeat(2.0 ** rng.integers(-40, 40, (n, hidden // 32)), 32, axis=1)
    normal = (rng.standard_normal((n, hidden)) * sizes).astype(F32)
    bits = rng.integers(0, 2 ** 32, (n, hidden), dtype=np.uint64).astype(np.uint32).view(F32)
    bits = np.where(np.isfinite(bits), bits, F32(1))
    return np.where(rng.random((n, 1)) < 0.2, bits, normal).astype(F32)


def expected(codes_or_words, d, ranks, experts, top_k, width, tokens, idx, w, algorithm, layout, alignment):
    """What rank d receives of per-rank rows `codes_or_words` (zeros where nothing is received)."""
    reference = Reference(ranks=ranks, experts=experts, top_k=top_k, hidden=width, max_tokens=tokens, algorithm=algorithm,
                          layout=layout, idx=idx, weights=w, alignment=alignment)
    return reference.receive(d, list(codes_or_words), None)["tokens"]


# -- quantising dispatch ----------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:overflow encountered in cast")   # f16 rows: 1e30 etc. become inf
@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("mode", ["float32", "ue8m0", "e8m0"])
def test_a_quantising_dispatch_receives_the_references_bytes_and_scales(mode, dtype, ranks):
    rng = np.random.default_rng([ranks, len(dtype), len(mode)])
    hidden = HIDDEN[mode]
    rows = np.concatenate([edge_rows(hidden), random_rows(rng, 48, hidden)])
    tokens = -(-len(rows) // ranks)
    rows = np.concatenate([rows, rows[:ranks * tokens - len(rows)]])
    sent = from_f32(rows, dtype).reshape(ranks, tokens, hidden)   # bf16: uint16 bits
    read = to_f32(sent, dtype)                                      # what the library reads, exactly
    quantised = [quantize_rows(read[s], mode) for s in range(ranks)]
    codes, words = [q[0] for q in quantised], [q[1] for q in quantised]
    experts, top_k = 2 * ranks, min(2, 2 * ranks)
    for n, (algorithm, layout, alignment) in enumerate(LAYOUTS):
        idx = np.stack([random_routing(rng, tokens, experts, top_k) for _ in range(ranks)]).astype(np.int32)
        w = rng.random((ranks, tokens, top_k)).astype(F32)
        with ep.VirtualGroup(ranks=ranks, experts=experts, hidden=hidden, top_k=top_k, max_tokens=tokens, algorithm=algorithm,
                             layout=layout, alignment=alignment, dtype=dtype, fp8=mode) as group:
            out = group.dispatch(sent if n % 2 == 0 else list(sent), idx, w)   # stacked and per-rank calls
            for d in range(ranks):
                args = (ranks, experts, top_k)
                want_codes = expected(codes, d, *args, hidden, tokens, idx, w, algorithm, layout, alignment)
                want_words = expected(words, d, *args, words[0].shape[1], tokens, idx, w, algorithm, layout, alignment)
                got_codes, got_words = np.asarray(out.tokens[d]), np.asarray(out.scales[d])
                assert got_codes.dtype == np.uint8 and got_words.dtype == want_words.dtype, (got_codes.dtype, got_words.dtype)
                where = f"{mode} {dtype} R={ranks} {layout} rank {d}"
                bad = np.argwhere(got_codes.reshape(-1, hidden) != want_codes.reshape(-1, hidden))
                assert bad.size == 0, f"{where}: {len(bad)} codes differ, first (row, column) {bad[0].tolist()}: " \
                    f"{got_codes.reshape(-1, hidden)[tuple(bad[0])]:#x}, reference {want_codes.reshape(-1, hidden)[tuple(bad[0])]:#x}"
                np.testing.assert_array_equal(got_words.view(np.uint32), want_words.view(np.uint32), err_msg=where)


# -- pass-through -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["float32", "ue8m0", "e8m0"])
def test_pass_through_moves_the_callers_bytes_unchanged(mode):
    """Any code (0x7F, 0xFF, 0x80 included) and any scale word (a signalling NaN, exponent bytes
    in the unused part of the last word) arrive as given, in every layout."""
    rng = np.random.default_rng(7)
    hidden = HIDDEN[mode]
    for ranks in (1, 2, 4):
        for n, (algorithm, layout, alignment) in enumerate(LAYOUTS):
            experts, top_k, tokens = 2 * ranks, min(2, 2 * ranks), 12
            with ep.VirtualGroup(ranks=ranks, experts=experts, hidden=hidden, top_k=top_k, max_tokens=tokens, algorithm=algorithm,
                                 layout=layout, alignment=alignment, dtype="bf16", fp8=mode, fp8_source="pass_through") as group:
                width = group.recv_scales_shape[-1]
                codes = rng.integers(0, 256, (ranks, tokens, hidden), dtype=np.uint8)
                bits = rng.integers(0, 2 ** 32, (ranks, tokens, width), dtype=np.uint64).astype(np.uint32)
                bits[:, ::3, 0] = 0x7F800001
                words = bits.view(F32 if mode == "float32" else np.int32)
                idx = np.stack([random_routing(rng, tokens, experts, top_k) for _ in range(ranks)]).astype(np.int32)
                w = rng.random((ranks, tokens, top_k)).astype(F32)
                stacked = n % 2 == 0
                out = group.dispatch(codes if stacked else list(codes), idx, w, scales=words if stacked else list(words))
                for d in range(ranks):
                    args = (ranks, experts, top_k)
                    want_codes = expected(codes, d, *args, hidden, tokens, idx, w, algorithm, layout, alignment)
                    want_words = expected(words, d, *args, width, tokens, idx, w, algorithm, layout, alignment)
                    where = f"{mode} R={ranks} {layout} rank {d}"
                    np.testing.assert_array_equal(np.asarray(out.tokens[d]), want_codes, err_msg=where)
                    np.testing.assert_array_equal(np.asarray(out.scales[d]).view(np.uint32), want_words.view(np.uint32), err_msg=where)


# -- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, hidden", [("float32", 100), ("float32", 160), ("ue8m0", 96), ("e8m0", 48), ("e8m0", 100)])
def test_a_hidden_size_off_the_block_is_a_named_error(mode, hidden):
    block = MODES[mode][0]
    with pytest.raises(ep.InvalidArgumentError, match=rf"hidden = {hidden}; must be a multiple of {block}"):
        ep.VirtualGroup(ranks=1, experts=1, hidden=hidden, top_k=1, max_tokens=2, dtype="bf16", fp8=mode)


@pytest.mark.parametrize("mode", ["float32", "ue8m0", "e8m0"])
def test_wrong_scales_and_fp8_into_combine_are_named_errors_that_write_nothing(mode):
    ranks, hidden, tokens = 2, HIDDEN[mode], 3
    scale_type, wrong_type = (F32, np.int32) if mode == "float32" else (np.int32, F32)
    idx = np.array([[[0, 1], [2, 3], [1, 2]]] * ranks, np.int32)
    w = np.ones((ranks, tokens, 2), F32)
    codes = np.full((ranks, tokens, hidden), 0x38, np.uint8)
    passing = ep.VirtualGroup(ranks=ranks, experts=4, hidden=hidden, top_k=2, max_tokens=tokens, algorithm="ht",
                              dtype="bf16", fp8=mode, fp8_source="pass_through")
    quantising = ep.VirtualGroup(ranks=ranks, experts=4, hidden=hidden, top_k=2, max_tokens=tokens, algorithm="ht",
                                 dtype="bf16", fp8=mode)
    width = passing.recv_scales_shape[-1]

    def outputs(group):
        return (np.full((ranks,) + group.recv_shape, 0xAA, np.uint8), np.full((ranks,) + group.recv_routing_shape, 7, np.int32),
                np.full((ranks,) + group.recv_routing_shape, 7, F32), None, np.full((ranks,) + group.recv_scales_shape, 5, scale_type))

    cases = [
        (passing, codes, {}, r"^scales: None; an FP8 pass-through group takes the scales"),
        (passing, codes, dict(scales=np.zeros((ranks, tokens, width + 1), scale_type)), r"^scales: shape"),
        (passing, codes, dict(scales=np.zeros((ranks, tokens + 1, width), scale_type)), r"^scales: shape"),
        (passing, codes, dict(scales=np.zeros((ranks, tokens, width), wrong_type)), r"^scales: dtype"),
        (passing, list(codes), dict(scales=[np.zeros((tokens, width), wrong_type)] * ranks), r"^scales\[0\]: dtype"),
        (passing, np.zeros((ranks, tokens, hidden), F32), dict(scales=np.zeros((ranks, tokens, width), scale_type)), r"^xs: dtype float32; must be e4m3"),
        (quantising, np.zeros((ranks, tokens, hidden), np.uint16), dict(scales=np.zeros((ranks, tokens, width), scale_type)),
         r"^scales: given; only FP8 pass-through groups take scales"),
        (quantising, codes, {}, r"^xs: dtype uint8; must be bf16"),
    ]
    for group, xs, kwargs, message in cases:
        out = outputs(group)
        with pytest.raises(ep.InvalidArgumentError, match=message):
            group.dispatch(xs, idx, w, out=out, **kwargs)
        assert all(np.array_equal(a, b) for a, b in zip(out, outputs(group)) if a is not None), message

    received = quantising.dispatch(np.zeros((ranks, tokens, hidden), np.uint16), idx, w)
    for expert_outputs in (np.zeros((ranks,) + quantising.recv_shape, np.uint8), [np.asarray(t) for t in received.tokens]):
        combined = np.full((ranks, tokens, hidden), 0x1234, np.uint16)
        with pytest.raises(ep.InvalidArgumentError, match=r"^expert_outputs(\[0\])?: dtype uint8; must be bf16"):
            quantising.combine(expert_outputs, received.handle, out=combined)
        assert np.all(combined == 0x1234)
    passing.close()
    quantising.close()
