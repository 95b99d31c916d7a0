#!/usr/bin/env python3
"""Writes the seed corpus of Tests/fuzz/abi_fuzz.c into Tests/fuzz/corpus/ (committed; rerun
after changing the decoder). Each seed is named for what it does: valid steps of every layout,
per-rank steps, masks and cleans, and bad ones (wrong configs, wrong tensors, calls out of
order). The encoder below mirrors abi_fuzz.c's decoder byte for byte: a 0 byte always means
"the right value", so a seed lists only what differs."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# ops (abi_fuzz.c: the call sequence switch, o % 16)
UPDATE, DISPATCH, COMBINE, DEACTIVATE, CLEAN, LAYOUT, STATUS, PER_RANK, DESTROY_HANDLES, DESTROY_GROUP = 0, 3, 6, 9, 10, 11, 12, 13, 14, 15
# tensor mutations (abi.c: arg(), 208 + case)
def mutation(case):
    return 208 + case


class Seed:
    """One input: the config, then calls. `layout`: 'em', 'rm', 'flat', 'padded'."""

    def __init__(self, layout="em", ranks=2, local=2, top_k=2, dtype="f32", hidden_units=1, bmax=2, capacity=None,
                 drop=False, alignment=0, wrong=0, backend=0):
        ht = layout in ("flat", "padded")
        self.layout, self.R, self.K, self.Bmax, self.ht = layout, ranks, top_k, bmax, ht
        self.E = ranks * local
        lb = {"em": 1, "rm": 2, "flat": 1, "padded": 2}[layout]
        nb = (0x80 if drop else 0) | ((1 | (capacity << 1)) if capacity is not None else 0)
        self.bytes = [1 if ht else 0, lb, ranks - 1, local - 1, top_k - 1, {"bf16": 0, "f16": 1, "f32": 2, "u8": 3}[dtype],
                      hidden_units - 1, bmax - 1, nb, alignment, 0, wrong, backend]
        self.bytes += [0] * ranks  # received topkIdx dtypes: int32
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
            for start, kind in rows[r]:
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
            self.op(m[2] if len(m) > 2 else 0)  # received tokens
            if self.routing_outputs:
                self.op(0, 0)  # received topkIdx, topkWeights
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
    """counts[r] tokens per rank, expert windows spread over the experts."""
    out = []
    for r, n in enumerate(counts):
        out.append([((r * 3 + t * 5) % seed.E, 0x10 if minus_one and t == 0 else 0) for t in range(n)])
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
