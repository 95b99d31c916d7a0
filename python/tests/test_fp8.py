"""FP8 dispatch through the package on the CPU backend: rows arrive as e4m3 codes (NumPy uint8)
with a scale per block; they decode to the sent rows within e4m3's precision; a pass-through group
moves the caller's codes and scales unchanged; wrong settings and scales are named errors."""

import numpy as np
import pytest

import expert_parallel as ep

H = 256


def decode_e4m3(codes):
    """OCP e4m3 codes as float32 (NaN for 0x7F / 0xFF)."""
    c = codes.astype(np.int32)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exponent, mantissa = (c >> 3) & 0xF, c & 0x7
    value = np.where(exponent == 0, mantissa / 8.0 * 2.0 ** -6, (1 + mantissa / 8.0) * 2.0 ** (exponent - 7))
    value = np.where((c & 0x7F) == 0x7F, np.nan, value)
    return (sign * value).astype(np.float32)


def block_scales(scales, mode, blocks):
    if mode == "float32":
        return scales.astype(np.float32)
    exponent_bytes = scales.view(np.uint8).reshape(scales.shape[0], -1)[:, :blocks]
    return (2.0 ** (exponent_bytes.astype(np.float64) - 127)).astype(np.float32)


def one_rank(mode, source="quantize", dtype="f32"):
    return ep.VirtualGroup(ranks=1, experts=1, hidden=H, top_k=1, max_tokens=6, dtype=dtype, fp8=mode, fp8_source=source)


@pytest.mark.parametrize("mode", ["float32", "ue8m0", "e8m0"])
def test_quantised_rows_decode_to_the_sent_rows_and_pass_through_unchanged(mode):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 6, H)) * np.repeat(2.0 ** rng.integers(-6, 6, (1, 6, H // 32)), 32, axis=2)).astype(np.float32)
    idx = np.zeros((1, 6, 1), np.int32)
    group = one_rank(mode)
    assert group.fp8 == mode and group.recv_scales_shape is not None
    w = np.ones((1, 6, 1), np.float32)
    out = group.dispatch(x, idx, w)
    codes, scales = out.tokens[0][0, :6], out.scales[0][0, :6]
    assert codes.dtype == np.uint8 and scales.dtype == (np.float32 if mode == "float32" else np.int32)
    block = {"float32": 128, "ue8m0": 128, "e8m0": 32}[mode]
    per_block = block_scales(scales, mode, H // block)
    decoded = decode_e4m3(codes) * np.repeat(per_block, block, axis=1)
    amax = np.repeat(np.abs(x[0]).reshape(6, -1, block).max(axis=2), block, axis=1)
    # e4m3 keeps 3 mantissa bits: within 1/16 of a value, or of the block's smallest normal step.
    assert np.all(np.abs(decoded - x[0]) <= np.maximum(np.abs(x[0]) / 16, amax * 2.0 ** -9 * 2)), mode
    assert out.expert_counts[0].tolist() == [6]

    passing = one_rank(mode, "pass_through")
    again = passing.dispatch(codes[None].copy(), idx, w, scales=scales[None].copy())
    assert np.array_equal(again.tokens[0][0, :6], codes) and np.array_equal(again.scales[0][0, :6], scales)
    # Combine stays in the element type.
    combined = group.combine(np.zeros((1,) + group.recv_shape, np.float32), out.handle)
    assert combined[0].dtype == np.float32 and not combined[0].any()


def test_fp8_settings_and_scales_are_checked_by_name():
    with pytest.raises(ep.InvalidArgumentError, match="hidden = 100; must be a multiple of 128"):
        ep.VirtualGroup(ranks=1, experts=1, hidden=100, top_k=1, max_tokens=2, dtype="f32", fp8="float32")
    with pytest.raises(ep.InvalidArgumentError, match="fp8="):
        one_rank("fp4")
    with pytest.raises(ep.InvalidArgumentError, match="fp8_source = 'pass_through'; needs an fp8 mode"):
        ep.VirtualGroup(ranks=1, experts=1, hidden=H, top_k=1, max_tokens=2, dtype="f32", fp8_source="pass_through")
    passing = one_rank("ue8m0", "pass_through")
    codes, idx = np.zeros((1, 2, H), np.uint8), np.zeros((1, 2, 1), np.int32)
    with pytest.raises(ep.InvalidArgumentError, match="scales: None"):
        passing.dispatch(codes, idx)
    with pytest.raises(ep.InvalidArgumentError, match="scales"):
        passing.dispatch(codes, idx, scales=np.zeros((1, 2, 2), np.float32))   # ue8m0 scales are int32 words
    with pytest.raises(ep.InvalidArgumentError, match="scales: given"):
        one_rank("float32").dispatch(np.zeros((1, 2, H), np.float32), idx, scales=np.zeros((1, 2, 2), np.float32))


def test_a_torch_uint8_tensor_is_taken_as_e4m3_codes_where_a_group_passes_fp8_through():
    """The e4m3 rows of a pass-through group may come as float8_e4m3fn or as their uint8 codes,
    stacked or per rank, with the same bits received."""
    torch = pytest.importorskip("torch")
    import expert_parallel as ep
    rng = np.random.default_rng(5)
    group = ep.VirtualGroup(ranks=2, experts=4, hidden=128, top_k=2, max_tokens=4, dtype="bf16", fp8="float32",
                            fp8_source="pass_through", buffer_slots=1)
    codes = torch.from_numpy(rng.integers(0, 0x7F, (2, 3, 128), dtype=np.uint8))
    idx = torch.tensor([[[0, 1], [2, 3], [1, 2]]] * 2, dtype=torch.int32)
    w, scales = torch.rand(2, 3, 2), torch.rand(2, 3, 1)
    want = [t.view(torch.uint8).clone() for t in group.dispatch(codes.view(torch.float8_e4m3fn), idx, w, scales=scales).tokens]
    for xs, s in ((codes, scales), (list(codes), list(scales))):
        got = group.dispatch(xs, idx if xs is codes else list(idx), w if xs is codes else list(w), scales=s).tokens
        assert all(torch.equal(a.view(torch.uint8), b) for a, b in zip(got, want))


@pytest.mark.parametrize("mode", ["float32", "ue8m0", "e8m0"])
@pytest.mark.parametrize("layout", ["flat", "expert_major_padded"])
@pytest.mark.parametrize("stacked", [True, False])
def test_an_fp8_dispatch_receives_into_the_callers_arrays(mode, layout, stacked):
    """out= with e4m3 rows and the received scales (an FP8 group needs both; the rows' type was
    checked as the element type, which the library then refused): the same rows, routing and
    scales as the group's own buffers receive."""
    rng = np.random.default_rng(3)
    r, b, k, e = 2, 5, 2, 4
    group = ep.VirtualGroup(ranks=r, experts=e, hidden=H, top_k=k, max_tokens=b, dtype="f32", algorithm="ht", layout=layout,
                            alignment=4 if layout == "expert_major_padded" else 1, fp8=mode)
    x = rng.standard_normal((r, b, H)).astype(np.float32)
    idx = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(b)]) for _ in range(r)]).astype(np.int32)
    w = rng.random((r, b, k)).astype(np.float32)
    own = group.dispatch(x, idx, w)
    want = [np.array(a) for a in (own.received, own.topk_idx, own.topk_weights, own.scales)]
    y = rng.standard_normal((r,) + group.recv_shape).astype(np.float32)
    combined = np.stack(group.combine(y, own.handle))
    tokens = np.full((r,) + group.recv_shape, 0xAA, np.uint8)
    routing = (np.zeros((r,) + group.recv_routing_shape, np.int32), np.zeros((r,) + group.recv_routing_shape, np.float32))
    scales = np.zeros((r,) + group.recv_scales_shape, np.float32 if mode == "float32" else np.int32)
    out = (tokens,) + routing + (None, scales)
    if not stacked:
        out = tuple(None if a is None else list(a) for a in out)
    got = group.dispatch(x, idx, w, out=out)
    assert all(np.shares_memory(got.scales[i], scales[i]) for i in range(r))
    used = [np.flatnonzero(want[3][i].reshape(want[3].shape[1], -1).any(axis=1)) for i in range(r)]
    for i in range(r):
        rows = used[i]
        assert np.array_equal(tokens[i][rows], want[0][i][rows]), i
        assert np.array_equal(scales[i][rows], np.array(want[3][i])[rows]), i
        assert np.array_equal(routing[0][i][rows], want[1][i][rows]) and np.array_equal(routing[1][i][rows], want[2][i][rows]), i
    # The step combines as the group's own dispatch's did.
    np.testing.assert_array_equal(np.stack(group.combine(y, got.handle)), combined)


def test_an_fp8_groups_out_needs_its_scales_and_a_plain_group_takes_none():
    group = ep.VirtualGroup(ranks=1, experts=2, hidden=H, top_k=1, max_tokens=2, dtype="f32", algorithm="ht", fp8="float32")
    x, idx, w = np.ones((1, 2, H), np.float32), np.zeros((1, 2, 1), np.int32), np.ones((1, 2, 1), np.float32)
    routing = (np.zeros((1,) + group.recv_routing_shape, np.int32), np.zeros((1,) + group.recv_routing_shape, np.float32))
    tokens = np.zeros((1,) + group.recv_shape, np.uint8)
    with pytest.raises(ep.InvalidArgumentError, match=r"^out: an FP8 group receives scales beside its e4m3 rows"):
        group.dispatch(x, idx, w, out=(tokens,) + routing)
    with pytest.raises(ep.InvalidArgumentError, match=r"^out tokens\[0\]: dtype float32; must be e4m3"):
        group.dispatch(x, idx, w, out=(np.zeros((1,) + group.recv_shape, np.float32),) + routing
                       + (None, np.zeros((1,) + group.recv_scales_shape, np.float32)))
    with pytest.raises(ep.InvalidArgumentError, match=r"^out scales\[0\]: dtype int32; must be f32"):
        group.dispatch(x, idx, w, out=(tokens,) + routing + (None, np.zeros((1,) + group.recv_scales_shape, np.int32)))
    plain = ep.VirtualGroup(ranks=1, experts=2, hidden=H, top_k=1, max_tokens=2, dtype="f32", algorithm="ht")
    with pytest.raises(ep.InvalidArgumentError, match=r"^out scales: given; only FP8 groups receive scales"):
        plain.dispatch(x, idx, w, out=(np.zeros((1,) + plain.recv_shape, np.float32),) + routing + (None, np.zeros((1, 2, 2), np.float32)))
