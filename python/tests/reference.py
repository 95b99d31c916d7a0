"""An independent NumPy reference of dispatch and combine, written from the semantics of
docs/architecture.md ("Order and arithmetic") (it shares no code with the library): what every rank must receive, the counters it must
report, and what every combine must return, bit for bit.

Arithmetic. Combine accumulates in float32 with one fused multiply-add per term, in a fixed
order, and rounds once to the element type at the end. NumPy has no fma, so :func:`fma_f32`
computes fmaf(w, x, acc) exactly: w*x of two float32 values is exact in float64, the float64
sum's rounding error is recovered exactly (TwoSum), and the one case where rounding the float64
sum to float32 would differ from rounding the exact sum (the sum lands exactly halfway between
two float32 values while the error is non-zero) is broken toward the error's sign. So the
reference's combine is the correctly rounded result, and the tests assert bitwise equality.
test_reference.py checks fma_f32 against exact rational arithmetic.
"""

import numpy as np

F32, F64 = np.float32, np.float64


# -- element types ---------------------------------------------------------------------------

def bf16_to_f32(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(F32)


def f32_to_bf16(values):
    """Round to nearest even; NaN stays NaN (quiet)."""
    bits = np.asarray(values, dtype=F32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(values, dtype=F32))
    return np.where(nan, ((bits >> 16) | 0x0040).astype(np.uint16), rounded)


def to_f32(array, dtype):
    if dtype == "bf16":
        return bf16_to_f32(array)
    return np.asarray(array).astype(F32)


def from_f32(values, dtype):
    if dtype == "bf16":
        return f32_to_bf16(values)
    if dtype == "f16":
        return values.astype(np.float16)
    return values.astype(F32)


def round_trip(values, dtype):
    return to_f32(from_f32(values, dtype), dtype)


def numpy_dtype(dtype):
    return {"bf16": np.uint16, "f16": np.float16, "f32": F32, "u8": np.uint8}[dtype]


# -- fused multiply-add ----------------------------------------------------------------------

def fma_f32(w, x, acc):
    """fmaf(w, x, acc) elementwise for float32 inputs: w*x + acc rounded once to float32."""
    product = np.asarray(w, dtype=F32).astype(F64) * np.asarray(x, dtype=F32).astype(F64)  # exact
    addend = np.asarray(acc, dtype=F32).astype(F64)
    total = product + addend
    back = total - product
    error = (product - (total - back)) + (addend - back)  # total + error == product + addend exactly
    result = total.astype(F32)
    offset = total - result.astype(F64)  # exact (Sterbenz)
    direction = np.where(offset > 0, F32(np.inf), F32(-np.inf))
    neighbour = np.nextafter(result, direction)
    halfway = (offset != 0) & (neighbour.astype(F64) - total == offset)
    upper, lower = np.maximum(result, neighbour), np.minimum(result, neighbour)
    result = np.where(halfway & (error > 0), upper, result)
    result = np.where(halfway & (error < 0), lower, result)
    return result.astype(F32)


# -- routing ---------------------------------------------------------------------------------

def round_up(value, multiple):
    return (value + multiple - 1) // multiple * multiple


class Reference:
    """Expected results of one step.

    `idx[s]`: [B_s, K] expert ids of rank s (-1: none); `weights[s]`: [B_s, K] float32;
    `inactive`: masked ranks (they send and receive nothing; their selections count as -1).
    """

    def __init__(self, *, ranks, experts, top_k, hidden, max_tokens, algorithm, layout, idx, weights,
                 alignment=1, capacity=None, overflow="fail", inactive=()):
        self.R, self.E, self.K, self.H, self.Bmax = ranks, experts, top_k, hidden, max_tokens
        self.L = experts // ranks
        self.algorithm, self.layout, self.alignment, self.overflow = algorithm, layout, alignment, overflow
        self.idx = [np.asarray(i).astype(np.int64).reshape(-1, top_k) for i in idx]
        self.weights = [np.asarray(w, dtype=F32).reshape(-1, top_k) for w in weights]
        self.inactive = set(inactive)
        self.tokens = [len(i) for i in self.idx]
        self.capacity = capacity if capacity is not None else self.default_capacity()

    def default_capacity(self):
        R, Bmax, K, L, a = self.R, self.Bmax, self.K, self.L, self.alignment
        if self.layout == "expert_major":
            return L * R * Bmax
        if self.layout == "rank_major":
            return R * Bmax
        if self.layout == "flat":
            return R * Bmax
        return R * Bmax * min(K, L) + L * (a - 1)

    @property
    def recv_shape(self):
        if self.layout == "expert_major":
            return (self.L, self.R * self.Bmax, self.H)
        if self.layout == "rank_major":
            return (self.R, self.Bmax, self.H)
        return (self.capacity, self.H)

    @property
    def recv_routing_shape(self):
        return {"expert_major": None, "rank_major": (self.R, self.Bmax, self.K), "flat": (self.capacity, self.K),
                "expert_major_padded": (self.capacity,)}[self.layout]

    def expert(self, s, t, c):
        """The global expert of selection (s, t, c) after masking, or None."""
        e = int(self.idx[s][t, c])
        if e < 0 or s in self.inactive or e // self.L in self.inactive:
            return None
        return e

    def selections(self, s, t, d):
        """(column, local expert) of token (s, t)'s selections on rank d, ascending column."""
        found = []
        for c in range(self.K):
            e = self.expert(s, t, c)
            if e is not None and e // self.L == d:
                found.append((c, e % self.L))
        return found

    def destinations(self, s, t):
        return sorted({e // self.L for c in range(self.K) if (e := self.expert(s, t, c)) is not None})

    def offered(self, d):
        return [(s, t) for s in range(self.R) for t in range(self.tokens[s]) if self.selections(s, t, d)]

    def rows_occupied(self, pairs, d):
        if self.layout != "expert_major_padded":
            return len(pairs)
        counts = [0] * self.L
        for s, t in pairs:
            for _, local in self.selections(s, t, d):
                counts[local] += 1
        return sum(round_up(n, self.alignment) for n in counts)

    def kept(self, d):
        pairs = self.offered(d)
        if self.algorithm != "ht" or self.overflow != "drop":
            return pairs
        count = 0
        while count < len(pairs) and self.rows_occupied(pairs[:count + 1], d) <= self.capacity:
            count += 1
        return pairs[:count]

    def overflowing_rank(self):
        """HT with overflow="fail": the first rank whose receive buffer would overflow, or None."""
        if self.algorithm != "ht" or self.overflow != "fail":
            return None
        for d in range(self.R):
            if self.rows_occupied(self.offered(d), d) > self.capacity:
                return d
        return None

    # -- dispatch ----------------------------------------------------------------------------

    def receive(self, d, xs, element_dtype):
        """What rank d holds after dispatch, starting from zeroed outputs: a dict with `tokens`,
        `topk_idx`, `topk_weights` (None where the layout has none), `layout` (the counters as
        plain lists), and the slot maps combine uses."""
        R, L, K, Bmax = self.R, self.L, self.K, self.Bmax
        rows = int(np.prod(self.recv_shape[:-1]))
        tokens = np.zeros((rows, self.H), dtype=np.asarray(xs[0]).dtype)
        routing_shape = self.recv_routing_shape
        topk_idx = None if routing_shape is None else np.zeros(routing_shape, dtype=np.int32)
        topk_w = None if routing_shape is None else np.zeros(routing_shape, dtype=F32)
        pair_row, selection_slot = {}, {}
        info = dict(expert_counters=[0] * L, expert_offsets=[0] * L, source_rank_counters=[0] * R,
                    expert_source_counters=[[0] * R for _ in range(L)], received_total=0, dropped_tokens=0)
        if d in self.inactive:
            return dict(tokens=tokens.reshape(self.recv_shape), topk_idx=topk_idx, topk_weights=topk_w,
                        layout=info, pair_row=pair_row, selection_slot=selection_slot)
        kept = self.kept(d)
        info["dropped_tokens"] = len(self.offered(d)) - len(kept)
        per_expert = [[] for _ in range(L)]  # (source, token, column), in (source, token) order
        for s, t in kept:
            info["source_rank_counters"][s] += 1
            for c, local in self.selections(s, t, d):
                per_expert[local].append((s, t, c))
                info["expert_source_counters"][local][s] += 1
        info["expert_counters"] = [len(z) for z in per_expert]

        def routing_row(s, t):
            ids = np.full(K, -1, dtype=np.int32)
            ws = np.zeros(K, dtype=F32)
            for c, local in self.selections(s, t, d):
                ids[c], ws[c] = local, self.weights[s][t, c]
            return ids, ws

        if self.layout == "expert_major":
            for local, zone in enumerate(per_expert):
                start = local * R * Bmax
                info["expert_offsets"][local] = start
                for i, (s, t, c) in enumerate(zone):
                    tokens[start + i] = xs[s][t]
                    selection_slot[(s, t, c)] = start + i
            info["received_total"] = sum(info["expert_counters"])
        elif self.layout in ("rank_major", "flat"):
            next_row = [0] * R
            for n, (s, t) in enumerate(kept):
                row = s * Bmax + next_row[s] if self.layout == "rank_major" else n
                next_row[s] += 1
                tokens[row] = xs[s][t]
                pair_row[(s, t)] = row
                ids, ws = routing_row(s, t)
                topk_idx.reshape(-1, K)[row] = ids
                topk_w.reshape(-1, K)[row] = ws
            info["received_total"] = len(kept)
        else:  # expert_major_padded
            start = 0
            for local, zone in enumerate(per_expert):
                info["expert_offsets"][local] = start
                for i, (s, t, c) in enumerate(zone):
                    tokens[start + i] = xs[s][t]
                    topk_idx[start + i] = local
                    topk_w[start + i] = self.weights[s][t, c]
                    selection_slot[(s, t, c)] = start + i
                for slot in range(start + len(zone), start + round_up(len(zone), self.alignment)):
                    topk_idx[slot] = -1  # padding: zero row, weight 0, index -1
                start += round_up(len(zone), self.alignment)
            info["received_total"] = start
        return dict(tokens=tokens.reshape(self.recv_shape), topk_idx=topk_idx, topk_weights=topk_w,
                    layout=info, pair_row=pair_row, selection_slot=selection_slot)

    # -- combine -----------------------------------------------------------------------------

    def combine(self, s, expert_outputs, received, element_dtype, direction="forward", weight_gradients=None):
        """Rank s's combined tokens ([B_s, H], element type) and, for backward HT, its [B_s, K]
        weight gradients. `expert_outputs[d]`: rank d's combine input (recv_shape);
        `received[d]`: `receive(d, ...)`; `weight_gradients[d]`: backward HT input of rank d."""
        forward = direction == "forward"
        flat = [to_f32(np.asarray(y).reshape(-1, self.H), element_dtype) for y in expert_outputs]
        out = np.zeros((self.tokens[s], self.H), dtype=F32)
        gradients = np.zeros((self.tokens[s], self.K), dtype=F32)
        if s in self.inactive:
            return from_f32(out, element_dtype), gradients
        one = F32(1)
        for t in range(self.tokens[s]):
            acc = np.zeros(self.H, dtype=F32)
            if self.layout == "expert_major":
                for c in range(self.K):
                    e = self.expert(s, t, c)
                    if e is None:
                        continue
                    d = e // self.L
                    slot = received[d]["selection_slot"][(s, t, c)]
                    acc = fma_f32(self.weights[s][t, c] if forward else one, flat[d][slot], acc)
            elif self.layout in ("rank_major", "flat"):
                for d in self.destinations(s, t):
                    row = received[d]["pair_row"].get((s, t))
                    if row is not None:
                        acc = fma_f32(one, flat[d][row], acc)
            else:
                for d in self.destinations(s, t):
                    slots = [(self.expert(s, t, c), c) for c, _ in self.selections(s, t, d)]
                    if (s, t, slots[0][1]) not in received[d]["selection_slot"]:
                        continue  # dropped
                    partial = np.zeros(self.H, dtype=F32)
                    for _, c in sorted(slots):  # ascending expert id
                        slot = received[d]["selection_slot"][(s, t, c)]
                        w = received[d]["topk_weights"][slot] if forward else one
                        partial = fma_f32(w, flat[d][slot], partial)
                    acc = fma_f32(one, round_trip(partial, element_dtype), acc)
            out[t] = acc
            if not forward and self.algorithm == "ht":
                for c in range(self.K):
                    e = self.expert(s, t, c)
                    if e is None:
                        continue
                    d = e // self.L
                    if self.layout == "expert_major_padded":
                        slot = received[d]["selection_slot"].get((s, t, c))
                        gradients[t, c] = 0 if slot is None else weight_gradients[d][slot]
                    else:
                        row = received[d]["pair_row"].get((s, t))
                        gradients[t, c] = 0 if row is None else weight_gradients[d][row, c]
        return from_f32(out, element_dtype), gradients


# -- inputs ----------------------------------------------------------------------------------

def random_routing(rng, tokens, experts, top_k, minus_one_rate=0.1):
    """[tokens, top_k] distinct experts per row, some entries -1."""
    idx = np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)]) if tokens else np.zeros((0, top_k), int)
    idx = np.where(rng.random(idx.shape) < minus_one_rate, -1, idx)
    return idx.astype(np.int64)


def random_payload(rng, shape, dtype):
    """Finite values of moderate size in the element type (bf16: uint16 bits)."""
    values = (rng.standard_normal(shape) * 3).astype(F32)
    if dtype == "u8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return from_f32(values, dtype)
