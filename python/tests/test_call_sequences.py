"""A property test of random call sequences through the C ABI's collective calls on the host
backend (ctypes, raw entry points): update, dispatch, combine, deactivate and clean in any order,
with right and wrong arguments, over random configs of every layout. After every call:

- no crash, and the status is a named one (never epInternalError, nor a CUDA/NCCL status);
- a refusal has a message "<entry point>: [rank r: ]<what>" that names the field (with its value
  and bound) or says the call is out of order (or the overflow, or the masked rank);
- a refused call wrote nothing: every output (poisoned before the call) is unchanged, and so is
  every layout info; inputs are never written, and masked ranks' outputs are never written;
- an accepted call equals the NumPy reference (tests/reference.py), bit for bit: received rows,
  routing and counters after dispatch; combined rows (and weight gradients) after combine;
- order: dispatch is accepted only after a successful update whose mask still holds, combine
  only after a dispatch of that step; calls with right arguments in the right order are
  accepted (epOverflow aside).

Tests/fuzz/abi_fuzz.c (scripts/fuzz) explores the same calls coverage-guided, without the
numeric oracle."""

import ctypes
import re

import numpy as np
import pytest

from expert_parallel import _abi
from expert_parallel._library import load
from expert_parallel.group import _LayoutBuffers
from reference import Reference, random_payload, random_routing

SEQUENCES = 200
CALLS = 16
# What the sequences exercised (test_the_sequences_reach_every_check asserts each happened).
SEEN = {"refused": 0, "dispatch checked": 0, "combine checked": 0, "backward HT checked": 0, "overflow": 0,
        "out of order": 0, "masked rank": 0}
POISON = 0xA5

DTYPE_CODES = {"f32": _abi.F32, "bf16": _abi.BF16, "f16": _abi.F16, "u8": _abi.U8}
ARRAY_CODES = {np.dtype(np.float32): _abi.F32, np.dtype(np.int32): _abi.I32, np.dtype(np.int64): _abi.I64,
               np.dtype(np.uint8): _abi.U8, np.dtype(np.float16): _abi.F16}
NAMED = re.compile(
    r"^(?P<call>ep\w+): (rank \d+: )?("
    r"invalid (argument|configuration): \S.* = .+; \S+"
    r"|invalid argument: inputs\[\d+\]\.topkIdx token \d+ names expert -?\d+ twice"
    r"|call out of order: \S+"
    r"|overflow: rank \d+ would receive \d+ rows"
    r"|rank \d+ is masked inactive)")
LAYOUTS = [("ll", "expert_major"), ("ll", "rank_major"), ("ht", "flat"), ("ht", "expert_major_padded")]


def descriptor(array, code=None):
    """The epTensor_t of a C-contiguous array (bf16 payloads are uint16 arrays: pass `code`)."""
    t = _abi.new(_abi.Tensor, data=array.ctypes.data if array.size else None,
                 dtype=code if code is not None else ARRAY_CODES[array.dtype], ndim=array.ndim, device=-1)
    stride = 1
    for i in reversed(range(array.ndim)):
        t.sizes[i] = array.shape[i]
        t.strides[i] = stride
        stride *= array.shape[i]
    return t


def poisoned(shape, dtype):
    array = np.empty(shape, dtype=dtype)
    array.view(np.uint8)[...] = POISON
    return array


class Sequence:
    """One group, the model of its state, and the checks of every call."""

    def __init__(self, rng):
        self.rng = rng
        self.lib = load()
        self.algorithm, self.layout = LAYOUTS[rng.integers(len(LAYOUTS))]
        self.R = int(rng.integers(1, 5))
        self.L = int(rng.integers(1, 4))
        self.E = self.R * self.L
        self.K = int(rng.integers(1, min(self.E, 4) + 1))
        self.dtype = str(rng.choice(["f32", "bf16", "f16", "f32", "u8"]))
        self.np_dtype = {"f32": np.float32, "bf16": np.uint16, "f16": np.float16, "u8": np.uint8}[self.dtype]
        units = 8 // np.dtype(self.np_dtype).itemsize
        self.H = int(units * rng.integers(1, 4))
        self.Bmax = int(rng.integers(1, 6))
        self.alignment = int(rng.choice([1, 2, 3, 4])) if self.layout == "expert_major_padded" else 1
        self.capacity = None
        self.overflow = "fail"
        if self.algorithm == "ht" and rng.random() < 0.5:
            self.capacity = int(rng.integers(1, self.R * self.Bmax * 2 + 1))
            self.overflow = str(rng.choice(["fail", "drop"]))
        config = _abi.new(
            _abi.GroupConfig, algorithm=_abi.ALGORITHMS[self.algorithm], layout=_abi.LAYOUTS[self.layout],
            alignment=self.alignment if self.layout == "expert_major_padded" else 0, ranks=self.R, experts=self.E,
            topK=self.K, hidden=self.H, elementType=DTYPE_CODES[self.dtype], maxTokensPerRank=self.Bmax,
            maxReceivedTokensPerRank=self.capacity or 0, overflow=_abi.OVERFLOW_POLICIES[self.overflow],
            timeoutSeconds=5.0)
        self.group = ctypes.c_void_p()
        rc = self.lib.epGroupCreate(ctypes.byref(config), None, ctypes.byref(self.group))
        assert rc == 0, self.message()
        info = _abi.new(_abi.GroupInfo)
        assert self.lib.epGroupGetInfo(self.group, ctypes.byref(info)) == 0
        self.recv_shape = tuple(info.receiveShape[:info.receiveNdim])
        self.routing_shape = tuple(info.receiveRoutingShape[:info.receiveRoutingNdim]) or None
        self.mask = set(range(self.R))
        self.step = None          # the model's step: dict(ref, tokens, mask, dispatched, received)
        self.maybe_void = False   # an update failed after the step's (the step may stand or be void)
        self.trace = [f"R={self.R} E={self.E} K={self.K} H={self.H} Bmax={self.Bmax} {self.algorithm} {self.layout} "
                      f"{self.dtype} alignment={self.alignment} capacity={self.capacity} overflow={self.overflow}"]
        # Per-rank inputs of the current step (made at each update).
        self.idx = self.x = self.w = None

    def close(self):
        assert self.lib.epGroupDestroy(self.group) == 0

    def message(self):
        return self.lib.epGetLastErrorMessage().decode()

    def fail(self, what):
        pytest.fail(what + "\nsequence:\n  " + "\n  ".join(self.trace))

    # -- the checks every call shares --------------------------------------------------------

    def checked_call(self, name, *arguments, outputs=(), inputs=(), infos=()):
        """Calls `name`; checks status, message, and that a refusal wrote nothing. `outputs` and
        `inputs` are (rank, array) pairs; `infos` (rank, _LayoutBuffers)."""
        before_out = [(r, a, a.copy()) for r, a in outputs]
        before_in = [(r, a, a.copy()) for r, a in inputs]
        for _, buffers in infos:
            buffers.struct.receivedTotal = -77
            buffers.struct.droppedTokens = -77
        rc = getattr(self.lib, name)(*arguments)
        text = self.message()
        self.trace.append(f"{name} -> {rc} {text}")
        if rc in (_abi.INTERNAL_ERROR, _abi.CUDA_ERROR, _abi.NCCL_ERROR) or not 0 <= rc <= _abi.INTERNAL_ERROR:
            self.fail(f"{name} returned status {rc}: {text}")
        if rc == 0:
            if text:
                self.fail(f"{name} succeeded with a message: {text}")
        else:
            SEEN["refused"] += 1
            SEEN["overflow"] += rc == _abi.OVERFLOW
            SEEN["out of order"] += "call out of order" in text
            match = NAMED.match(text)
            if not match or match.group("call") != name:
                self.fail(f"{name} -> {rc} with a message that names no field or order: {text!r}")
        for r, array, copy in before_in:
            if array.tobytes() != copy.tobytes():
                self.fail(f"{name} wrote into an input of rank {r}")
        for r, array, copy in before_out:
            written = array.tobytes() != copy.tobytes()
            if written and rc != 0:
                self.fail(f"{name} -> {rc} ({text}) wrote into an output of rank {r}")
            if written and r not in self.mask:
                self.fail(f"{name} wrote into the output of masked rank {r}")
        for r, buffers in infos:
            written = buffers.struct.receivedTotal != -77
            if written and (rc != 0 or r not in self.mask):
                self.fail(f"{name} -> {rc} wrote the layout info of rank {r}")
        return rc, text

    # -- one wrong argument ------------------------------------------------------------------

    def break_one(self, arrays, structs_of, rank):
        """Makes one of rank `rank`'s tensors wrong; returns a description. `arrays[rank]` is a
        dict name -> (array, code); `structs_of` rebuilds the structs."""
        names = sorted(arrays[rank])
        name = names[self.rng.integers(len(names))]
        array, code = arrays[rank][name]
        kind = int(self.rng.integers(5))
        if kind == 0:  # wrong dtype (int32 payloads, or float16 where float32 is wanted)
            wrong = np.zeros(array.shape, np.int32 if array.dtype != np.int32 else np.float32)
            arrays[rank][name] = (wrong, None)
        elif kind == 1:  # one row too many
            arrays[rank][name] = (np.zeros((array.shape[0] + 1,) + array.shape[1:], array.dtype), code)
        elif kind == 2 and array.ndim > 1:  # last dimension one too long
            arrays[rank][name] = (np.zeros(array.shape[:-1] + (array.shape[-1] + 1,), array.dtype), code)
        elif kind == 3:  # a dimension dropped
            arrays[rank][name] = (np.zeros(array.shape[1:] if array.ndim > 1 else (array.shape[0], 1), array.dtype), code)
        else:  # NULL data (with elements) or no descriptor
            arrays[rank][name] = (None, "null")
        return f"rank {rank} {name}: kind {kind}"

    @staticmethod
    def pointer(entry, keep):
        array, code = entry
        if array is None:
            return None
        t = descriptor(array, code)
        keep.append(t)
        return ctypes.pointer(t)

    # -- calls -------------------------------------------------------------------------------

    def update(self, bad):
        tokens = [int(self.rng.integers(0, self.Bmax + 1)) for _ in range(self.R)]
        self.idx = [random_routing(self.rng, b, self.E, self.K, 0.15).astype(
            np.int32 if self.rng.random() < 0.5 else np.int64) for b in tokens]
        self.w = [self.rng.random((b, self.K)).astype(np.float32) for b in tokens]
        self.x = [random_payload(self.rng, (b, self.H), self.dtype) for b in tokens]
        arrays = [{"topkIdx": (self.idx[r], None)} for r in range(self.R)]
        note = ""
        if bad:
            r = int(self.rng.integers(self.R))
            if self.rng.random() < 0.5 and tokens[r] > 0:  # a wrong routing entry
                entry = self.rng.choice([self.E, -2, 1 << 20])
                self.idx[r][self.rng.integers(tokens[r]), self.rng.integers(self.K)] = entry
                if self.K > 1 and self.rng.random() < 0.5:
                    self.idx[r][0, 1] = self.idx[r][0, 0] if self.idx[r][0, 0] >= 0 else 0  # a repeated expert
                    self.idx[r][0, 0] = max(self.idx[r][0, 0], 0)
                note = f"rank {r} topkIdx entry"
            else:
                note = self.break_one(arrays, None, r)
        keep = []
        structs = (_abi.UpdateInputs * self.R)()
        for r in range(self.R):
            structs[r] = _abi.new(_abi.UpdateInputs, topkIdx=self.pointer(arrays[r]["topkIdx"], keep))
        self.trace.append(f"update tokens={tokens} bad={note!r} mask={sorted(self.mask)}")
        rc, _ = self.checked_call("epGroupUpdateAll", self.group, structs, None, None,
                                  inputs=[(r, a[0]) for r in range(self.R) for a in arrays[r].values() if a[0] is not None])
        ref = None
        if not bad:
            ref = Reference(ranks=self.R, experts=self.E, top_k=self.K, hidden=self.H, max_tokens=self.Bmax,
                            algorithm=self.algorithm, layout=self.layout, idx=[i.copy() for i in self.idx],
                            weights=self.w, alignment=self.alignment, capacity=self.capacity, overflow=self.overflow,
                            inactive=set(range(self.R)) - self.mask)
        if rc == _abi.OVERFLOW and (ref is None or ref.overflowing_rank() is None):
            self.fail("an overflow the reference does not expect")
        if rc == 0 and ref is not None and ref.overflowing_rank() is not None:
            self.fail(f"an update accepted where the reference overflows rank {ref.overflowing_rank()}")
        if rc == 0:
            ref = Reference(ranks=self.R, experts=self.E, top_k=self.K, hidden=self.H, max_tokens=self.Bmax,
                            algorithm=self.algorithm, layout=self.layout, idx=[i.copy() for i in self.idx],
                            weights=self.w, alignment=self.alignment, capacity=self.capacity, overflow=self.overflow,
                            inactive=set(range(self.R)) - self.mask)
            self.step = dict(ref=ref, tokens=tokens, mask=set(self.mask), dispatched=None, exact=not bad, **{"any dispatch": False},
                             x=list(self.x), w=list(self.w))
            self.maybe_void = False
        elif self.step is not None:
            self.maybe_void = True
        elif not bad and rc != _abi.OVERFLOW:
            self.fail("a right update was refused")

    def dispatch(self, bad):
        step = self.step
        tokens = step["tokens"] if step else [0] * self.R
        x = step["x"] if step else [np.zeros((0, self.H), self.np_dtype)] * self.R
        w = step["w"] if step else [np.zeros((0, self.K), np.float32)] * self.R
        code = DTYPE_CODES[self.dtype]
        recv = [poisoned(self.recv_shape, self.np_dtype) for _ in range(self.R)]
        recv_idx = recv_w = None
        arrays = [{"tokens": (x[r], code), "received": (recv[r], code)} for r in range(self.R)]
        if self.routing_shape:
            recv_idx = [poisoned(self.routing_shape, np.int32 if self.rng.random() < 0.5 else np.int64) for _ in range(self.R)]
            recv_w = [poisoned(self.routing_shape, np.float32) for _ in range(self.R)]
            for r in range(self.R):
                arrays[r].update(weights=(w[r], None), received_idx=(recv_idx[r], None), received_w=(recv_w[r], None))
        note = self.break_one(arrays, None, int(self.rng.integers(self.R))) if bad else ""
        infos = [_LayoutBuffers(self.L, self.R) for _ in range(self.R)]
        keep = []
        din, dout = (_abi.DispatchInputs * self.R)(), (_abi.DispatchOutputs * self.R)()
        for r in range(self.R):
            a = arrays[r]
            din[r] = _abi.new(_abi.DispatchInputs, tokens=self.pointer(a["tokens"], keep),
                              topkWeights=self.pointer(a["weights"], keep) if "weights" in a else None)
            dout[r] = _abi.new(_abi.DispatchOutputs, tokens=self.pointer(a["received"], keep),
                               topkIdx=self.pointer(a["received_idx"], keep) if "received_idx" in a else None,
                               topkWeights=self.pointer(a["received_w"], keep) if "received_w" in a else None,
                               layoutInfo=ctypes.pointer(infos[r].struct))
        outs = [(r, a[0]) for r in range(self.R) for k, a in arrays[r].items() if k.startswith("received") and a[0] is not None]
        ins = [(r, a[0]) for r in range(self.R) for k, a in arrays[r].items() if not k.startswith("received") and a[0] is not None]
        self.trace.append(f"dispatch bad={note!r} mask={sorted(self.mask)}")
        before = {r: [a.copy() for _, a in outs if _ == r] for r in range(self.R)}
        rc, text = self.checked_call("epGroupDispatchAll", self.group, din, dout, None, None, outputs=outs, inputs=ins,
                                     infos=list(enumerate(infos)))
        ready = step is not None and not self.maybe_void and step["mask"] == self.mask
        if rc == 0:
            if step is None or step["mask"] != self.mask:
                if self.mask:
                    self.fail("dispatch accepted without an update, or after the active ranks changed")
                return
            self.maybe_void = False
            step["any dispatch"] = True
            step["dispatched"] = dict(recv=recv, recv_idx=recv_idx, recv_w=recv_w) if not bad else None
            if not bad and step["exact"]:
                self.check_received(step, recv, recv_idx, recv_w, infos)
                SEEN["dispatch checked"] += 1
                SEEN["masked rank"] += len(self.mask) < self.R
        elif ready and not bad and step["exact"] and rc != _abi.OVERFLOW:
            self.fail(f"a right dispatch was refused: {text}")
        elif rc == _abi.OVERFLOW:
            ref = step["ref"] if step else None
            if ref is None or ref.overflowing_rank() is None:
                self.fail(f"an overflow the reference does not expect: {text}")
        del before

    def check_received(self, step, recv, recv_idx, recv_w, infos):
        ref = step["ref"]
        for d in range(self.R):
            if d not in self.mask:
                continue
            want = ref.receive(d, step["x"], self.dtype)
            got_info = infos[d].value()
            for field, value in want["layout"].items():
                if getattr(got_info, field) != value:
                    self.fail(f"rank {d}: {field} = {getattr(got_info, field)}, reference {value}")
            rows = recv[d].reshape(-1, self.H)
            want_rows = want["tokens"].reshape(-1, self.H)
            slots = set(want["pair_row"].values()) | set(want["selection_slot"].values())
            for row in range(rows.shape[0]):
                if row in slots:
                    if rows[row].tobytes() != want_rows[row].tobytes():
                        self.fail(f"rank {d}: received row {row} differs from the reference")
            if recv_idx is not None and self.layout != "expert_major_padded":
                for row in slots:
                    if not np.array_equal(recv_idx[d].reshape(-1, self.K)[row], want["topk_idx"].reshape(-1, self.K)[row]):
                        self.fail(f"rank {d}: received topkIdx row {row} differs from the reference")
                    if recv_w[d].reshape(-1, self.K)[row].tobytes() != want["topk_weights"].reshape(-1, self.K)[row].tobytes():
                        self.fail(f"rank {d}: received topkWeights row {row} differs from the reference")
            if recv_idx is not None and self.layout == "expert_major_padded":
                for slot in slots:
                    if recv_idx[d][slot] != want["topk_idx"][slot] or recv_w[d][slot] != want["topk_weights"][slot]:
                        self.fail(f"rank {d}: received slot {slot} routing differs from the reference")
            step.setdefault("received", {})[d] = want

    def combine(self, bad):
        step = self.step
        tokens = step["tokens"] if step else [0] * self.R
        backward = self.rng.random() < 0.3
        code = DTYPE_CODES[self.dtype]
        ys = [random_payload(self.rng, self.recv_shape, self.dtype) for _ in range(self.R)]
        out = [poisoned((tokens[r], self.H), self.np_dtype) for r in range(self.R)]
        arrays = [{"expert_outputs": (ys[r], code), "out": (out[r], code)} for r in range(self.R)]
        dispatched = step["dispatched"] if step else None
        grads_in = grads_out = None
        for r in range(self.R):
            if not backward and self.layout == "expert_major":
                w = step["w"][r] if step else np.zeros((0, self.K), np.float32)
                arrays[r]["weights"] = (w, None)
            if not backward and self.layout == "expert_major_padded":
                w = dispatched["recv_w"][r] if dispatched else np.zeros(self.routing_shape, np.float32)
                arrays[r]["weights"] = (w, None)
        if backward and self.algorithm == "ht":
            grads_in = [self.rng.random(self.routing_shape).astype(np.float32) for _ in range(self.R)]
            grads_out = [poisoned((tokens[r], self.K), np.float32) for r in range(self.R)]
            for r in range(self.R):
                arrays[r]["gradients"] = (grads_in[r], None)
                arrays[r]["out_gradients"] = (grads_out[r], None)
        note = self.break_one(arrays, None, int(self.rng.integers(self.R))) if bad else ""
        keep = []
        cin, cout = (_abi.CombineInputs * self.R)(), (_abi.CombineOutputs * self.R)()
        for r in range(self.R):
            a = arrays[r]
            cin[r] = _abi.new(_abi.CombineInputs, expertOutputs=self.pointer(a["expert_outputs"], keep),
                              topkWeights=self.pointer(a["weights"], keep) if "weights" in a else None,
                              weightGradients=self.pointer(a["gradients"], keep) if "gradients" in a else None)
            cout[r] = _abi.new(_abi.CombineOutputs, tokens=self.pointer(a["out"], keep),
                               topkWeightGradients=self.pointer(a["out_gradients"], keep) if "out_gradients" in a else None)
        config = _abi.new(_abi.CombineConfig, direction=_abi.DIRECTIONS["backward" if backward else "forward"])
        outs = [(r, a[0]) for r in range(self.R) for k, a in arrays[r].items() if k.startswith("out") and a[0] is not None]
        ins = [(r, a[0]) for r in range(self.R) for k, a in arrays[r].items() if not k.startswith("out") and a[0] is not None]
        self.trace.append(f"combine {'backward' if backward else 'forward'} bad={note!r} mask={sorted(self.mask)}")
        rc, text = self.checked_call("epGroupCombineAll", self.group, cin, cout, ctypes.byref(config), None,
                                     outputs=outs, inputs=ins)
        ready = (step is not None and not self.maybe_void and step["mask"] == self.mask and dispatched is not None
                 and step["exact"] and "received" in step)
        if rc == 0:
            if not self.mask:
                return  # every rank masked: the call reads nothing and does nothing
            if step is None or step["mask"] != self.mask:
                self.fail("combine accepted without an update, or after the active ranks changed")
            if self.dtype == "u8":
                self.fail("combine accepted u8 payloads")
            if not step["any dispatch"]:
                self.fail("combine accepted without a dispatch of the step")
            if ready and not bad:
                ref, received = step["ref"], step["received"]
                direction = "backward" if backward else "forward"
                for s in sorted(self.mask):
                    want, want_grads = ref.combine(s, ys, [received.get(d) for d in range(self.R)], self.dtype,
                                                   direction, grads_in)
                    if out[s].tobytes() != np.asarray(want).astype(self.np_dtype).tobytes():
                        self.fail(f"rank {s}: combined rows differ from the reference")
                    if grads_out is not None and grads_out[s].tobytes() != want_grads.tobytes():
                        self.fail(f"rank {s}: weight gradients differ from the reference")
                SEEN["combine checked"] += 1
                SEEN["backward HT checked"] += grads_out is not None
        elif ready and not bad and self.dtype != "u8":
            self.fail(f"a right combine was refused: {text}")

    def deactivate(self):
        rank = int(self.rng.integers(self.R))
        self.trace.append(f"deactivate {rank}")
        rc, text = self.checked_call("epGroupDeactivateRank", self.group, rank)
        if rc != 0:
            self.fail(f"deactivate({rank}) refused: {text}")
        self.mask.discard(rank)

    def clean(self):
        mask = int(self.rng.integers(1, 1 << self.R))
        self.trace.append(f"clean {mask:b}")
        rc, text = self.checked_call("epGroupCleanRanks", self.group, mask)
        if rc != 0:
            self.fail(f"clean({mask:b}) refused: {text}")
        self.mask |= {r for r in range(self.R) if mask >> r & 1}
        if self.step is not None:
            self.step["mask"] = None  # clean restarts the step numbering: update again
        active = ctypes.c_uint64()
        assert self.lib.epGroupGetActiveRanks(self.group, ctypes.byref(active)) == 0
        if {r for r in range(self.R) if active.value >> r & 1} != self.mask:
            self.fail(f"active ranks {active.value:b} after clean, model {sorted(self.mask)}")


@pytest.mark.parametrize("seed", range(SEQUENCES))
def test_random_call_sequences(seed):
    rng = np.random.default_rng(1000 + seed)
    sequence = Sequence(rng)
    try:
        for _ in range(CALLS):
            choice = rng.random()
            bad = rng.random() < 0.25
            if rng.random() < 0.5:  # half the calls follow the step's order, the others any order
                step = sequence.step
                if step is None or step["mask"] != sequence.mask or sequence.maybe_void:
                    choice = 0.0
                else:
                    choice = 0.3 if step["dispatched"] is None else 0.55
            if choice < 0.3:
                sequence.update(bad)
            elif choice < 0.55:
                sequence.dispatch(bad)
            elif choice < 0.8:
                sequence.combine(bad)
            elif choice < 0.9:
                sequence.deactivate()
            else:
                sequence.clean()
    finally:
        sequence.close()


def test_the_sequences_reach_every_check():
    """Runs after the sequences (same module, in order): each kind of check happened."""
    if SEEN["dispatch checked"] == 0:
        pytest.skip("run with the sequences")
    assert all(count > 0 for count in SEEN.values()), SEEN
    print(SEEN)
