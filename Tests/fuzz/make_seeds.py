#!/usr/bin/env python3
"""Writes the seed corpus of Tests/fuzz/abi_fuzz.c into Tests/fuzz/corpus/ (committed; rerun
after changing the decoder). Each seed is named for what it does: valid steps of every layout,
per-rank steps, masks and cleans, and bad ones (wrong configs, wrong tensors, calls out of
order). The encoder below mirrors abi_fuzz.c's decoder byte for byte: a 0 byte always means
"the right value", so a seed lists only what differs. Seeds named found-* are inputs the fuzzer
found (kept as they were; this script leaves them): found-refused-update-tiny-timeout, a refused
update whose waiting rank timed out (1e-9 s) and masked the refused one (abi_fuzz.c, after_refusal)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
EXPLICIT_ROWS = 16  # abi_fuzz.c: rows past these are drawn from the input's random stream

# ops (abi_fuzz.c: the call sequence switch, o % 16)
UPDATE, DISPATCH, COMBINE, DEACTIVATE, CLEAN, LAYOUT, STATUS, PER_RANK, DESTROY_HANDLES, DESTROY_GROUP = 0, 3, 6, 9, 10, 11, 12, 13, 14, 15
# tensor mutations (abi.c: arg(), 208 + case)
def mutation(case):
    return 208 + case


# The decoder's tables for the top byte values (abi_fuzz_config.h): byte & 7 picks one.
BIG_RANKS = [9, 12, 16, 24, 64, 32, 48, 10]           # ranks byte >= 0xF8
BIG_LOCAL = [4, 8, 16, 32, 64, 128, 256, 5]           # local experts byte >= 0xC0
BIG_K = [5, 8, 16, 32, 32, 6, 9, 24]                  # top-k byte >= 0xC0
BIG_HIDDEN = [64, 128, 256, 512, 1024, 2048, 4096, 7168]  # hidden byte >= 0xC0
BIG_TOKENS = [8, 16, 32, 64, 128, 256, 512, 100]      # Bmax byte >= 0xC0
BIG_ALIGNMENTS = [16, 64, 128, 1024, 7, 512, 1000, 1023]
BUDGET = 24 << 20
DTYPES = {"bf16": 0, "f16": 1, "f32": 2, "u8": 3}
FP8 = {None: 0, "f32": 1, "ue8m0": 2, "e8m0": 3}


def size_of(dtype):
    return {"bf16": 2, "f16": 2, "f32": 4, "u8": 1}[dtype]


def big(table, value, base):
    """The byte that decodes to `value` from `table` (its first index)."""
    return base | table.index(value)


class Shape:
    """The config the decoder ends with (abi_fuzz_config.h: decode_config's budget loop)."""

    def __init__(self, ht, layout, R, L, K, H, Bmax, dtype, fp8, capacity_byte, alignment, row_first):
        self.ht, self.layout, self.R, self.L, self.K, self.H, self.Bmax = ht, layout, R, L, K, H, Bmax
        self.es, self.fp8, self.capacity_byte, self.alignment = size_of(dtype), fp8, capacity_byte, alignment
        self.unit = (32 if fp8 == "e8m0" else 128) if fp8 else 8 // self.es
        self.set_capacity()
        while self.bytes() > BUDGET:
            if not row_first and self.Bmax > 1: self.Bmax = (self.Bmax + 1) // 2
            elif self.H > self.unit: self.H = max(self.unit, self.H // 2 // self.unit * self.unit)
            elif self.Bmax > 1: self.Bmax = (self.Bmax + 1) // 2
            elif self.L > 1: self.L //= 2
            elif self.R > 1: self.R //= 2
            else: break
            self.K = min(self.K, self.R * self.L)
            self.set_capacity()

    def rows(self, automatic=False):
        R, L, B, a = self.R, self.L, self.Bmax, max(self.alignment, 1)
        if self.layout == "em": return L * R * B
        if self.layout == "rm": return R * B
        if self.N and not automatic: return self.N
        return R * B if self.layout == "flat" else R * B * min(self.K, L) + L * (a - 1)

    def set_capacity(self):
        self.N = 0
        nb = self.capacity_byte
        if not self.ht or not nb & 1: return
        v = (nb >> 1) & 0x3F
        self.N = v if v < 24 else max(1, int(self.rows(automatic=True) * (v - 23) / 32))

    def bytes(self):
        rows, B, H, K = self.rows(), self.Bmax + 1, self.H, self.K
        words = H / 32 if self.fp8 else 0
        routing = 0 if self.layout == "em" else 16 if self.layout == "padded" else K * 16
        per_rank = rows * H * ((1 + self.es) if self.fp8 else self.es) + rows * 4 * words + rows * routing + B * H * self.es * 2 + B * K * 16
        return per_rank * self.R * 2


class Seed:
    """One input: the config, then calls. `layout`: 'em', 'rm', 'flat', 'padded'. The counts are
    the small ones (each byte its value - 1) unless a `*_byte` names the decoder's byte itself;
    `fp8`: None, 'f32', 'ue8m0', 'e8m0'; `fp8_source`: 'quantize' or 'pass'."""

    def __init__(self, layout="em", ranks=2, local=2, top_k=2, dtype="f32", hidden_units=1, bmax=2, capacity=None,
                 drop=False, alignment=0, wrong=0, backend=0, fp8=None, fp8_source="quantize", ranks_byte=None,
                 local_byte=None, k_byte=None, hidden_byte=None, bmax_byte=None, alignment_byte=None, capacity_byte=None,
                 rank_bytes=0):
        ht = layout in ("flat", "padded")
        lb = {"em": 1, "rm": 2, "flat": 1, "padded": 2}[layout]
        nb = (0x80 if drop else 0) | ((1 | (capacity << 1)) if capacity is not None else 0)
        if capacity_byte is not None: nb = (0x80 if drop else 0) | capacity_byte
        rb = ranks - 1 if ranks_byte is None else ranks_byte
        eb = local - 1 if local_byte is None else local_byte
        kb = top_k - 1 if k_byte is None else k_byte
        tb = DTYPES[dtype] | (FP8[fp8] << 2) | (0x20 if fp8_source == "pass" else 0)
        hb = hidden_units - 1 if hidden_byte is None else hidden_byte
        bb = bmax - 1 if bmax_byte is None else bmax_byte
        ab = alignment if alignment_byte is None else alignment_byte
        self.bytes = [1 if ht else 0, lb, rb, eb, kb, tb, hb, bb, nb, ab, 0, wrong, backend]
        # What the decoder makes of them.
        R = 1 + rb % 8 if rb < 0xF8 else BIG_RANKS[rb & 7]
        L = 1 + eb % 3 if eb < 0xC0 else BIG_LOCAL[eb & 7]
        if R * L > 4096: L = 4096 // R
        K = 1 + kb % min(R * L, 4) if kb < 0xC0 else min(BIG_K[kb & 7], R * L)
        es = size_of(dtype)
        unit = (32 if fp8 == "e8m0" else 128) if fp8 else 8 // es
        H = (1 + hb % 4) * unit if hb < 0xC0 else -(-BIG_HIDDEN[hb & 7] // unit) * unit
        B = 1 + bb % 4 if bb < 0xC0 else BIG_TOKENS[bb & 7]
        al = 0 if layout != "padded" else ([0, 1, 2, 4, 3, 8][ab % 6] if ab < 0xC0 else BIG_ALIGNMENTS[ab & 7])
        shape = Shape(ht, layout, R, L, K, H, B, dtype, fp8, nb, al, bool(bb & 0x20))
        self.layout, self.R, self.K, self.Bmax, self.ht = layout, shape.R, shape.K, shape.Bmax, ht
        self.E, self.H, self.shape = shape.R * shape.L, shape.H, shape
        self.fp8, self.pass_through = fp8, fp8 is not None and fp8_source == "pass"
        self.bytes += [rank_bytes] * self.R  # received topkIdx dtypes (bit 0), FP8 row dtypes (bits 1, 2)
        self.routing_outputs = layout != "em"

    def op(self, *values):
        self.bytes += list(values)
        return self

    def update(self, rows, per_rank=False, mutations=None, direction=0):
        """rows[r]: list of (start expert, row kind) per token; mutations[r]: the topkIdx byte."""
        if per_rank:
            self.op(PER_RANK, 0)
        else:
            self.op(UPDATE)
        self.op(direction)
        for r in range(self.R):
            self.op(len(rows[r]))
            for start, kind in rows[r][:EXPLICIT_ROWS]:  # later rows come from the random stream
                self.op(kind, start)
        for r in range(self.R):
            self.op(0, (mutations or {}).get(r, 0))  # struct byte, topkIdx
        if not per_rank:
            self.op(0)  # array byte
        return self

    def dispatch(self, per_rank=False, mutations=None, no_info=False):
        self.op(PER_RANK, 1) if per_rank else self.op(DISPATCH)
        self.op(0)
        for r in range(self.R):
            m = (mutations or {}).get(r, [])
            struct = 2 if no_info else 0
            self.op(struct, m[0] if len(m) > 0 else 0)  # tokens
            if self.routing_outputs:
                self.op(m[1] if len(m) > 1 else 0)  # topkWeights
            if self.pass_through:
                self.op(0)  # scales
            self.op(m[2] if len(m) > 2 else 0)  # received tokens
            if self.routing_outputs:
                self.op(0, 0)  # received topkIdx, topkWeights
            if self.fp8:
                self.op(0)  # received scales
        if not per_rank:
            self.op(0)
        return self

    def combine(self, per_rank=False, backward=False, mutations=None):
        self.op(PER_RANK, 2) if per_rank else self.op(COMBINE)
        self.op(3 if backward else 0)
        for r in range(self.R):
            m = (mutations or {}).get(r, 0)
            self.op(0, m)  # struct byte, expert outputs
            if not backward and self.layout in ("em", "padded"):
                self.op(0)  # topkWeights
            if backward and self.ht:
                self.op(0)  # weight gradients
            self.op(0)  # tokens
            if backward and self.ht:
                self.op(0)  # weight gradient outputs
        if not per_rank:
            self.op(0)
        return self

    def stacked_dispatch(self, tokens, broken=0, which=0):
        """The stacked dispatch (abi_fuzz.c: stacked(); update included): `tokens` per rank;
        `broken` >= 200 breaks one field (`which` picks it, broken % 8 how)."""
        return self.op(DISPATCH | 0xF0, tokens, broken, which)

    def stacked_combine(self, broken=0, which=0):
        return self.op(COMBINE | 0xF0, 0, broken, which)

    def step(self, rows, **kw):
        return self.update(rows, **kw).dispatch(**kw).combine(**kw)


def rows(seed, counts, minus_one=False):
    """counts[r] tokens per rank (at most the Bmax the decoder ends with), expert windows spread
    over the experts (start bytes < 256)."""
    out = []
    for r, n in enumerate(counts):
        n = min(n, seed.Bmax)
        out.append([((r * 3 + t * 5) % min(seed.E, 256), 0x10 if minus_one and t == 0 else 0) for t in range(n)])
    return out


def seeds():
    found = {}
    for layout in ("em", "rm", "flat", "padded"):
        for dtype in ("f32", "bf16"):
            s = Seed(layout, ranks=2, local=2, top_k=2, dtype=dtype, bmax=2, alignment=2 if layout == "padded" else 0)
            found[f"step-{layout}-{dtype}"] = s.step(rows(s, [2, 1])).step(rows(s, [0, 2], minus_one=True)).bytes
    s = Seed("em", ranks=3, local=2, top_k=3, bmax=3)
    found["step-em-3ranks-backward"] = s.update(rows(s, [3, 2, 1])).dispatch().combine(backward=True).bytes
    s = Seed("flat", ranks=2, local=2, top_k=2, bmax=3)
    found["step-flat-backward"] = s.update(rows(s, [3, 2])).dispatch().combine(backward=True).bytes
    s = Seed("flat", ranks=4, local=1, top_k=2, bmax=4, capacity=3, drop=True)
    found["step-flat-drop"] = s.step(rows(s, [4, 4, 3, 2])).bytes
    s = Seed("flat", ranks=2, local=2, top_k=2, bmax=4, capacity=2)
    found["overflow-flat-fail"] = s.update(rows(s, [4, 4])).dispatch().bytes
    s = Seed("rm", ranks=2, local=1, top_k=1, dtype="u8", bmax=2)
    found["step-rm-u8-dispatch-only"] = s.step(rows(s, [2, 2])).bytes
    s = Seed("em", ranks=2, local=2, top_k=2, bmax=2)
    found["per-rank-step-em"] = s.step(rows(s, [2, 1]), per_rank=True).bytes
    s = Seed("padded", ranks=2, local=2, top_k=2, bmax=2, alignment=3)
    found["per-rank-step-padded"] = s.step(rows(s, [1, 2]), per_rank=True).bytes
    s = Seed("em", ranks=3, local=1, top_k=2, bmax=2)
    found["mask-deactivate-step-clean-step"] = (s.op(DEACTIVATE, 1).step(rows(s, [2, 0, 1])).op(CLEAN, 0xFF)
                                                .step(rows(s, [1, 1, 1])).op(LAYOUT, 2, STATUS).bytes)
    s = Seed("rm", ranks=2, local=2, top_k=2, bmax=2)
    found["mask-between-update-and-dispatch"] = s.update(rows(s, [2, 2])).op(DEACTIVATE, 1).dispatch().bytes
    # Bad ones.
    s = Seed("em")
    found["order-dispatch-before-update"] = s.dispatch().combine().bytes
    s = Seed("em")
    found["order-combine-after-update"] = s.update(rows(s, [1, 1])).combine().bytes
    s = Seed("rm")
    found["order-failed-update-then-dispatch"] = (s.update(rows(s, [1, 1])).update([[(0, 0xF8)], [(1, 0)]])
                                                  .dispatch().bytes)
    s = Seed("em")
    found["bad-tensors-dispatch"] = (s.update(rows(s, [2, 1])).dispatch(mutations={0: [mutation(0)], 1: [0, 0, mutation(9)]})
                                     .dispatch(mutations={1: [mutation(6)]}).dispatch(mutations={0: [mutation(7)]})
                                     .dispatch(mutations={0: [mutation(11)], 1: [mutation(1)]}).dispatch().bytes)
    s = Seed("flat", bmax=2)
    found["bad-routing-rows"] = s.update([[(0, 0xF8), (1, 0xF9)], [(0, 0xFA)]]).update([[], [(0, 0xFB)]]).bytes
    s = Seed("padded", alignment=2)
    found["bad-update-descriptors"] = (s.update(rows(s, [1, 1]), mutations={0: mutation(3), 1: mutation(12)})
                                       .update(rows(s, [1, 1]), mutations={0: mutation(13), 1: mutation(15)}).bytes)
    for case, name in [(0xE0, "ranks"), (0xE1, "experts"), (0xE2, "topk"), (0xE5, "hidden-bytes"), (0xE6, "dtype"),
                       (0xE7, "bmax"), (0xE9, "overflow"), (0xEB, "timeout"), (0xEC, "struct-size"), (0xED, "algorithm")]:
        found[f"bad-config-{name}"] = Seed("em", wrong=case).bytes
    found["bad-config-capacity-ll"] = Seed("em", wrong=0xE8).bytes
    found["bad-backend-struct"] = Seed("em", backend=0xFA).bytes
    s = Seed("em")
    found["destroy-group-keeps-handles"] = (s.update(rows(s, [1, 1]), per_rank=True).op(DESTROY_GROUP | 0xC0)
                                            .dispatch(per_rank=True).combine(per_rank=True).dispatch().bytes)
    s = Seed("rm")
    found["destroy-handles-then-use"] = s.step(rows(s, [1, 2]), per_rank=True).op(DESTROY_HANDLES | 0x80).bytes
    for layout in ("em", "rm", "flat", "padded"):
        s = Seed(layout, ranks=2, local=2, top_k=2, bmax=2, alignment=2 if layout == "padded" else 0)
        found[f"stacked-step-{layout}"] = s.stacked_dispatch(2).stacked_combine().stacked_dispatch(1).combine().bytes
    s = Seed("em")
    for how, which in [(200, 1), (201, 3), (202, 0), (203, 1), (204, 4), (205, 1), (206, 0), (207, 2)]:
        s.stacked_dispatch(1, how, which)
    found["stacked-bad-dispatch"] = s.stacked_dispatch(1).stacked_combine(203, 1).stacked_combine(204, 0).stacked_combine().bytes
    found.update(large_seeds())
    found.update(fp8_seeds())
    found.update(bound_seeds())
    return found


def fp8_seeds():
    """FP8 dispatch in every layout, scale mode and source (rows of one block or a few)."""
    found = {}
    for layout in ("em", "rm", "flat", "padded"):
        for mode, source, dtype in [("f32", "quantize", "bf16"), ("ue8m0", "pass", "f32"), ("e8m0", "quantize", "f16"), ("e8m0", "pass", "bf16")]:
            s = Seed(layout, ranks=2, local=2, top_k=2, dtype=dtype, bmax=3, fp8=mode, fp8_source=source,
                     hidden_units=2 if mode == "e8m0" else 1, alignment=2 if layout == "padded" else 0, rank_bytes=6 if source == "pass" else 0)
            s.step(rows(s, [3, 2])).update(rows(s, [1, 3])).dispatch().combine(backward=True)
            found[f"fp8-{layout}-{mode}-{source}-{dtype}"] = s.bytes
    s = Seed("flat", ranks=4, local=2, top_k=2, dtype="bf16", bmax=4, fp8="ue8m0", capacity=5, drop=True)
    found["fp8-flat-drop"] = s.step(rows(s, [4, 4, 3, 4])).bytes
    for layout in ("em", "padded"):
        s = Seed(layout, ranks=2, local=2, top_k=2, dtype="bf16", bmax=2, fp8="f32", alignment=2 if layout == "padded" else 0)
        found[f"fp8-stacked-{layout}"] = s.stacked_dispatch(2).stacked_combine().bytes
    return found


def large_seeds():
    """Large valid configs: long rows, top-k 32, hundreds of experts, Bmax in the hundreds, 8 and 64
    ranks, alignment 1024, capacity shares with drop."""
    found = {}
    s = Seed("flat", ranks=8, local_byte=big(BIG_LOCAL, 32, 0xC0), k_byte=big(BIG_K, 8, 0xC0), dtype="bf16",
             hidden_byte=big(BIG_HIDDEN, 7168, 0xC0), bmax_byte=big(BIG_TOKENS, 8, 0xC0))
    found["large-flat-h7168-e256-k8-r8"] = s.step(rows(s, [8, 7, 8, 6, 8, 8, 5, 8])).bytes
    s = Seed("em", ranks=8, local_byte=big(BIG_LOCAL, 32, 0xC0), k_byte=big(BIG_K, 32, 0xC0), dtype="bf16",
             hidden_byte=big(BIG_HIDDEN, 128, 0xC0), bmax_byte=big(BIG_TOKENS, 16, 0xC0))
    found["large-ll-em-e256-k32"] = s.step(rows(s, [16, 3, 16, 0, 9, 16, 16, 1])).bytes
    s = Seed("rm", ranks=2, local=3, top_k=3, dtype="f16", bmax_byte=big(BIG_TOKENS, 512, 0xC0))
    found["large-rm-bmax512"] = s.step(rows(s, [s.Bmax, s.Bmax - 3])).bytes
    s = Seed("padded", ranks=4, local_byte=big(BIG_LOCAL, 4, 0xC0), top_k=4, dtype="f32",
             alignment_byte=big(BIG_ALIGNMENTS, 1024, 0xC0), bmax=4)
    found["large-padded-align1024"] = s.step(rows(s, [4, 3, 4, 2])).update(rows(s, [4, 4, 1, 4])).dispatch().combine(backward=True).bytes
    s = Seed("padded", ranks=8, local_byte=big(BIG_LOCAL, 16, 0xC0), k_byte=big(BIG_K, 16, 0xC0), dtype="bf16",
             hidden_byte=big(BIG_HIDDEN, 1024, 0xC0), bmax_byte=big(BIG_TOKENS, 32, 0xC0), alignment_byte=big(BIG_ALIGNMENTS, 16, 0xC0))
    found["large-padded-e128-k16-h1024"] = s.step(rows(s, [s.Bmax] * 8)).bytes
    s = Seed("flat", ranks=8, local=2, top_k=4, dtype="bf16", bmax_byte=big(BIG_TOKENS, 128, 0xC0), drop=True,
             capacity_byte=1 | (40 << 1), hidden_byte=big(BIG_HIDDEN, 256, 0xC0))
    found["large-flat-drop-share"] = s.step(rows(s, [s.Bmax] * 8)).bytes
    s = Seed("padded", ranks=4, local=3, top_k=3, dtype="f32", bmax_byte=big(BIG_TOKENS, 64, 0xC0), drop=True,
             capacity_byte=1 | (30 << 1), alignment=4)
    found["large-padded-drop-share"] = s.step(rows(s, [s.Bmax] * 4)).bytes
    s = Seed("flat", ranks=4, local=2, top_k=2, dtype="f32", bmax_byte=big(BIG_TOKENS, 64, 0xC0), capacity_byte=1 | (30 << 1))
    found["large-flat-overflow-share"] = s.update(rows(s, [s.Bmax] * 4)).update(rows(s, [2, 2, 2, 2])).dispatch().combine().bytes
    s = Seed("em", ranks_byte=big(BIG_RANKS, 64, 0xF8), local=2, top_k=2, dtype="bf16", bmax=2)
    assert s.R == 64
    found["large-64-ranks-em"] = s.step(rows(s, [1] * 64)).bytes
    s = Seed("flat", ranks_byte=big(BIG_RANKS, 32, 0xF8), local=1, top_k=3, dtype="f32", bmax=1)
    found["large-32-ranks-flat-backward"] = s.update(rows(s, [1] * 32)).dispatch().combine(backward=True).bytes
    s = Seed("padded", ranks=8, local_byte=big(BIG_LOCAL, 8, 0xC0), k_byte=big(BIG_K, 16, 0xC0), dtype="bf16", fp8="e8m0",
             fp8_source="pass", hidden_byte=big(BIG_HIDDEN, 2048, 0xC0), bmax_byte=big(BIG_TOKENS, 8, 0xC0), alignment=4)
    found["large-fp8-padded-pass-h2048"] = s.step(rows(s, [s.Bmax] * 8)).bytes
    s = Seed("em", ranks=4, local_byte=big(BIG_LOCAL, 16, 0xC0), k_byte=big(BIG_K, 8, 0xC0), dtype="f32", fp8="f32",
             hidden_byte=big(BIG_HIDDEN, 1024, 0xC0), bmax_byte=big(BIG_TOKENS, 8, 0xC0))
    found["large-fp8-ll-em-quantize-h1024"] = s.step(rows(s, [s.Bmax] * 4)).bytes
    s = Seed("rm", ranks=8, local=2, top_k=4, dtype="bf16", bmax_byte=big(BIG_TOKENS, 128, 0xC0) | 0x20,
             hidden_byte=big(BIG_HIDDEN, 4096, 0xC0))  # bit 5: the rows shrink before the tokens
    found["large-rm-rows-first"] = s.step(rows(s, [min(s.Bmax, 20)] * 8)).bytes
    for name, seed in found.items():
        assert seed and len(seed) <= 1024, (name, len(seed))
    return found


# abi_fuzz_config.h bound_case: wrong-config byte 192 + v.
BOUNDS = ["ranks-64", "ranks-65", "ranks-negative", "topk-32", "topk-33", "topk-experts", "hidden-int32-max",
          "hidden-largest", "hidden-2-31", "hidden-int64-max", "bmax-int32-max", "bmax-2-31", "bmax-int64-min",
          "experts-largest", "experts-int32-min", "capacity-2-40", "capacity-past-2-40", "capacity-int64-min",
          "alignment-1024", "alignment-past", "timeout-1ns", "timeout-day", "timeout-past-day", "timeout-minus-zero",
          "fp8-scales-unknown", "fp8-source-unknown", "fp8-e8m0-32", "fp8-block-128-hidden-160", "element-e4m3",
          "layout-negative", "struct-size-larger", "every-count-largest"]


def bound_seeds():
    """Every bound case, on a config whose step runs where it is valid and fits."""
    found = {}
    for v, name in enumerate(BOUNDS):
        layout = "padded" if "alignment" in name or "capacity" in name else "flat" if v in (3, 5, 20) else "em"
        s = Seed(layout, ranks=2, local=2, top_k=2, dtype="bf16", bmax=2, wrong=192 + v, alignment=2 if layout == "padded" else 0)
        if name == "ranks-64":
            s.R, s.E, s.bytes = 64, 128, s.bytes + [0] * 62
        elif name == "topk-32":
            s.K, s.E = 32, 32
        if name in ("ranks-64", "topk-32", "topk-experts", "alignment-1024", "timeout-1ns", "timeout-day", "timeout-minus-zero"):
            s.step(rows(s, [2, 1] + [1] * (s.R - 2)))
        found[f"bound-{name}"] = s.bytes
    for layout, ranks in (("em", 8), ("rm", 2), ("flat", 4), ("padded", 2)):  # a sparse step at Bmax = Int32.max
        s = Seed(layout, ranks=ranks, local=2, top_k=2, dtype="f32" if layout == "flat" else "bf16", bmax=2,
                 wrong=192 + BOUNDS.index("bmax-int32-max"), alignment_byte=big(BIG_ALIGNMENTS, 1024, 0xC0) if layout == "padded" else 0)
        found[f"bound-bmax-int32-max-{layout}-{ranks}-ranks"] = s.bytes
    for layout in ("flat", "padded"):  # ... with drop at a capacity of 1 and 3 rows
        s = Seed(layout, ranks=2, local=2, top_k=2, dtype="bf16", bmax=2, drop=True, capacity=1 if layout == "flat" else 3,
                 wrong=192 + BOUNDS.index("bmax-int32-max"))
        found[f"bound-bmax-int32-max-{layout}-drop"] = s.bytes
    s = Seed("em", fp8="e8m0", wrong=192 + 26)
    found["bound-fp8-e8m0-32-step"] = s.step(rows(s, [2, 1])).bytes
    return found


def main():
    corpus = os.path.join(HERE, "corpus")
    os.makedirs(corpus, exist_ok=True)
    for name, data in seeds().items():
        with open(os.path.join(corpus, name), "wb") as f:
            f.write(bytes(b & 0xFF for b in data))
    print(f"wrote {len(seeds())} seeds to {corpus}", file=sys.stderr)


if __name__ == "__main__":
    main()
