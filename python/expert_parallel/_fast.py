"""The data path's per-call work, kept small: a tensor is looked at once (address, type, shape,
device, contiguity) and compared with what the call expects; the descriptors the library reads
are made once per group and only their address and row count are patched per call. A tensor
that does not match goes through :func:`_arrays.tensor`, whose error names what is wrong."""

import array
import ctypes
import importlib
import operator
import os
import struct

from . import _abi, _arrays
from .errors import InvalidArgumentError

_torch_codes = None
_raw_stream = None
_MAX_HANDLE = 2**64 - 1


def _torch_dtype_codes():
    global _torch_codes
    if _torch_codes is None:
        import torch

        _torch_codes = {torch.bfloat16: _abi.BF16, torch.float16: _abi.F16, torch.float32: _abi.F32,
                        torch.int32: _abi.I32, torch.int64: _abi.I64, torch.uint8: _abi.U8}
        if hasattr(torch, "float8_e4m3fn"):
            _torch_codes[torch.float8_e4m3fn] = _abi.E4M3
    return _torch_codes


_NUMPY_CODES = {"float16": _abi.F16, "float32": _abi.F32, "int32": _abi.I32, "int64": _abi.I64, "uint8": _abi.U8}
_numpy_dtypes = {}   # NumPy dtype object -> (code, or BF16 for uint16 bits; native byte order)


class NoTensorYet:
    """tensor_type's value before torch is seen: a type no value has (not type(None), which None
    has: a None argument then passed the in-line checks as a tensor)."""


_tensor_type = None   # torch.Tensor itself, once one was seen: the common case, one type check
tensor_type = NoTensorYet   # the same for callers that test in line (never matches before torch is seen)
torch_codes = {}      # torch dtype -> epDataType_t, once torch was seen


UNMADE = object()   # a group's _torch_fast spec before its first common call (the group's _fast_spec_made)
# epDataType_t of bf16, f16, f32, i32, i64, u8 and e4m3, as _torch_fast.spec takes them.
TORCH_FAST_CODES = (_abi.BF16, _abi.F16, _abi.F32, _abi.I32, _abi.I64, _abi.U8, _abi.E4M3)


def torch_fast_module():
    """expert_parallel._torch_fast (the common calls' tensors read in C++, _torch_fast.cpp) where
    it was built against this torch, or None: not built, built for another torch or Python, or
    EP_TORCH_FAST=0. Then the package's Python path takes every call."""
    if os.environ.get("EP_TORCH_FAST") == "0":
        return None
    try:
        torch = importlib.import_module("torch")   # (the module links torch's libraries: torch loads them first)
        module = importlib.import_module(__package__ + "._torch_fast")
    except ImportError:   # (no torch, not built here, or an undefined symbol of another torch)
        return None
    # It reads torch's tensors through torch's headers, inline: only with the torch it was built against.
    return module if getattr(module, "torch_version", None) == torch.__version__ else None


def entry_address(function):
    """The C address of a ctypes function, or None for anything else (a stand-in of Python's)."""
    return ctypes.cast(function, ctypes.c_void_p).value if isinstance(function, ctypes._CFuncPtr) else None


# What look() answers for a torch tensor the in-line paths must not take (no storage, sizes or
# strides, or no memory of its own): not fine, so that _arrays.tensor names it.
_UNREADABLE = (0, None, (), -3, False)


def look(value, expected):
    """(address, epDataType_t, shape, device ordinal or -1, contiguous and native) of a torch
    tensor or NumPy array, or None when it is neither; `expected`: the accepted types (a uint16
    NumPy array is bf16 where bf16 is accepted)."""
    global _tensor_type, tensor_type, torch_codes
    if type(value) is not _tensor_type:
        found = _arrays.kind(value)
        if found != "torch":
            return _look_numpy(value, expected) if found == "numpy" else None
        torch_codes = _torch_dtype_codes()   # made once
        if type(value).__name__ == "Tensor":
            _tensor_type = tensor_type = type(value)
        elif _arrays.traced(value) is not None:   # (a FakeTensor: its data_ptr() is 0, with a warning) _arrays.tensor names it
            return _UNREADABLE
    try:
        where = value.get_device()
        if where < 0 and not value.is_cpu:
            where = -2   # a meta tensor (or another device's): -1 is the CPU's alone
        return (value.data_ptr(), _torch_codes.get(value.dtype), value.shape, where, value.is_contiguous())
    except RuntimeError:   # a sparse or nested tensor (no storage, sizes or strides): not fine, _arrays.tensor names it
        return _UNREADABLE


def _look_numpy(value, expected):
    """look() for a NumPy array."""
    dtype = value.dtype
    known = _numpy_dtypes.get(dtype)
    if known is None:
        known = _numpy_dtypes[dtype] = (dtype.name, dtype.isnative)
    name, native = known
    code = (_abi.BF16 if name == "uint16" and _abi.BF16 in expected
            else _abi.E4M3 if name == "uint8" and _abi.E4M3 in expected else _NUMPY_CODES.get(name))
    flags = value.flags
    return (value.__array_interface__["data"][0], code, value.shape, -1,
            flags.c_contiguous and flags.aligned and native)


def sound(value, address, size=None):
    """Whether torch tensor `value`, contiguous at `address` (its data_ptr()) and `size` bytes long
    (None: value.nbytes), is its memory as the library reads and writes it by address: not a
    negative view, and its storage holds those bytes (one shrunk by ``untyped_storage().resize_()``
    since may not). False sends a call to its general path, where `_arrays.memory_error` names what
    is wrong (or, for an empty tensor past a storage's end, finds nothing to read). Asked of every
    caller's tensor whose address a call takes: ~0.3 µs."""
    try:
        if value.is_neg():
            return False
        storage = value.untyped_storage()
        return address + (value.nbytes if size is None else size) <= storage.data_ptr() + len(storage)
    except RuntimeError:   # no memory to read (a functional tensor's storage: torch raises)
        return False


def per_rank(lists):
    """What the common per-rank-list call depends on of each torch tensor of `lists` (sequences of
    per-rank tensors), each property read once, in one pass: (properties: shape, dtype,
    get_device(), is_contiguous() of each tensor in turn, flat; addresses; the bytes each
    tensor's storage holds from its address). None where an entry is not a plain torch.Tensor
    (a NumPy array, a subclass, anything else), is a negative view, has no memory (address 0: a
    meta tensor; an empty one), or has no sizes, strides or memory (a sparse or nested tensor, a
    torch.func wrapper: torch raises): the general path names what is wrong. The caller
    compares the properties with the call's (shape, dtype, device, contiguity), and each
    tensor's bytes with what its storage holds (held(): a storage shrunk by
    ``untyped_storage().resize_()`` may not hold them, _fast.sound)."""
    tensor = _tensor_type
    if tensor is None and lists and len(lists[0]):   # (no torch tensor seen yet: look() learns the type from the first)
        look(lists[0][0], ())
        tensor = _tensor_type
    seen, addresses, rooms = [], [], []
    see, address_of, room_of = seen.extend, addresses.append, rooms.append
    try:
        for values in lists:
            for value in values:
                if type(value) is not tensor or value.is_neg():
                    return None
                see((value.shape, value.dtype, value.get_device(), value.is_contiguous()))
                address = value.data_ptr()
                if not address:
                    return None
                storage = value.untyped_storage()
                address_of(address)
                room_of(storage.data_ptr() + storage.nbytes() - address)
    except RuntimeError:
        return None
    return seen, addresses, rooms


def held(sizes, rooms):
    """Whether each tensor per_rank() read has its `sizes` bytes in its storage (its `rooms`)."""
    return all(map(operator.le, sizes, rooms))


def check(value, name, expected, device, shape, seen=None, index=None, output=False):
    """The address of `value` after checking it like :func:`_arrays.tensor` (None entries of
    `shape` accept any size); returns (address, epDataType_t, shape). `seen`: look(value,
    expected) where the caller has it already; `index`: an entry of a per-rank list, named
    ``name[index]`` in an error (the name is built only for one); `output`: the call writes it
    (a read-only NumPy array is refused)."""
    if output and type(value) is not _tensor_type and not _arrays.writable(value):
        _arrays.tensor(value, name if index is None else f"{name}[{index}]", dtypes=expected, device=device, shape=shape, writable=True)
    if seen is None:
        seen = look(value, expected)
    if seen is not None:
        address, code, sizes, where, fine = seen
        if fine and code in expected and where == device and len(sizes) == len(shape):
            matches = sizes == shape   # (a torch.Size or tuple against a tuple: one comparison)
            if not matches:   # (None entries of `shape` take any size)
                for want, got in zip(shape, sizes):
                    if want is not None and want != got:
                        break
                else:
                    matches = True
            if matches and ((type(value) is not _tensor_type and _arrays.kind(value) != "torch") or sound(value, address)):
                return address, code, sizes
    # The named error; or what look() does not map and tensor() accepts (a torch uint8 tensor as e4m3).
    if index is not None:
        name = f"{name}[{index}]"
    descriptor = _arrays.tensor(value, name, dtypes=expected, device=device, shape=shape, writable=output)
    return descriptor.data or 0, descriptor.dtype, tuple(descriptor.sizes[:descriptor.ndim])


# An epTensor_t's per-call fields as 8-byte words of an array of them: data; dtype with ndim
# (fixed) above it (little-endian); sizes[0]. Descriptors.set_many writes each field of every rank at
# once, a strided slice of the words.
_TENSOR_WORDS = ctypes.sizeof(_abi.Tensor) // 8
_DATA_WORD, _DTYPE_WORD, _ROWS_WORD = (getattr(_abi.Tensor, name).offset // 8 for name in ("data", "dtype", "sizes"))
if (ctypes.sizeof(_abi.Tensor) % 8 or _abi.Tensor.dtype.offset % 8 or _abi.Tensor.ndim.offset != _abi.Tensor.dtype.offset + 4
        or _abi.Tensor.data.offset % 8 or _abi.Tensor.sizes.offset % 8):
    raise AssertionError("epTensor_t: data, dtype with ndim, and sizes no longer fill 8-byte words of their own")


class Descriptors:
    """R epTensor_t of one argument, rank r's at index r, with fixed trailing sizes: per call only
    the address, the first size and the type change."""

    def __init__(self, ranks, device, dtype, tail):
        self.array = (_abi.Tensor * ranks)()
        self.pointers = [ctypes.pointer(self.array[r]) for r in range(ranks)]
        self.tail = tuple(tail)
        strides = [1] * (len(tail) + 1)
        for i in range(len(tail) - 1, -1, -1):
            strides[i] = strides[i + 1] * self.tail[i]
        for d in self.array:
            d.structSize = ctypes.sizeof(_abi.Tensor)
            d.device = device
            d.dtype = dtype
            d.ndim = len(tail) + 1
            for i, size in enumerate(self.tail):
                d.sizes[i + 1] = size
            for i, stride in enumerate(strides):
                d.strides[i] = stride
        self.row_elements = strides[0]
        self._stacked = None   # (base, rows, dtype) of the last set_all
        # set_all's filled arrays by key, as bytes: a group's buffer slots take turns, so the
        # same few stacked tensors come back, and one memmove restores a whole array.
        self._snapshots = {}
        self._many = None      # (addresses, rows, dtypes) of the last set_many
        self.addresses = [0] * ranks   # each rank's address, as set
        self._sizes = [d.sizes for d in self.array]   # each descriptor's sizes, as an array made once
        self._last = [None] * ranks   # (address, rows, dtype) as set() last wrote rank r's, or None
        self._words = memoryview(self.array).cast("B").cast("Q")   # (the same memory, for set_many)
        self._ndim_word = (len(tail) + 1) << 32   # (ndim, as the dtype's word holds it)

    def set_many(self, addresses, rows, dtypes):
        """Rank r's tensor at addresses[r] with rows[r] rows of type dtypes[r] (each a tuple or
        list of R); nothing to do when the same as the last call's. Each field of every rank in
        one write, and only the addresses where the rows and types are the last call's (a decode
        loop's new tensors each step: the same shapes at new addresses)."""
        key = (addresses, rows, dtypes)
        last = self._many
        if key == last:
            return
        words = self._words
        if last is None or rows != last[1] or dtypes != last[2]:
            words[_ROWS_WORD::_TENSOR_WORDS] = array.array("Q", rows)
            words[_DTYPE_WORD::_TENSOR_WORDS] = array.array("Q", [dtype | self._ndim_word for dtype in dtypes])
        words[_DATA_WORD::_TENSOR_WORDS] = array.array("Q", addresses)
        self.addresses[:] = addresses
        self._last = [None] * len(self._last)   # (set() writes again: what it recorded was overwritten)
        self._stacked = None
        self._many = key

    def set(self, r, address, rows, dtype):
        """Rank r's tensor at `address` with `rows` rows of type `dtype` (nothing to write when
        set() wrote the same last)."""
        self._stacked = self._many = None
        key = (address, rows, dtype)
        if self._last[r] == key:
            return
        self._last[r] = key
        self.addresses[r] = address
        d = self.array[r]
        d.data = address or None
        self._sizes[r][0] = rows
        d.dtype = dtype

    def set_all(self, base, rows, dtype, element_bytes):
        """Rank r's tensor at `base` + r × rows × row bytes (a stacked `[R, rows, ...]` tensor)."""
        key = (base, rows, dtype)
        if key == self._stacked:   # the same tensor as the last call (PyTorch's allocator reuses addresses)
            return
        self._many = None
        self._last = [None] * len(self._last)   # (the array is rewritten below: set() writes again)
        snapshot = self._snapshots.get(key)
        if snapshot is not None:
            ctypes.memmove(self.array, snapshot[0], len(snapshot[0]))
            self.addresses[:] = snapshot[1]
            self._stacked = key
            return
        step = rows * self.row_elements * element_bytes
        for r, d in enumerate(self.array):
            d.data = (base + r * step) or None
            self._sizes[r][0] = rows
            d.dtype = dtype
            self.addresses[r] = base + r * step
        if len(self._snapshots) >= 8:
            self._snapshots.clear()
        self._snapshots[key] = (bytes(self.array), tuple(self.addresses))
        self._stacked = key


def raw_stream(device, stream=None):
    """The CUstream of `stream` (a torch.cuda.Stream or an int handle), or of PyTorch's current
    stream on `device`; None on the CPU (device -1), whose calls take none (a `stream` of the
    wrong kind is named there too)."""
    global _raw_stream
    if stream is not None:
        handle = getattr(stream, "cuda_stream", stream)
        if type(handle) is not int:   # (ctypes would take a str as a pointer to its characters)
            raise InvalidArgumentError(
                f"stream: a {type(stream).__name__}; must be a torch.cuda.Stream or an int CUstream handle")
        if not 0 <= handle <= _MAX_HANDLE:   # (ctypes would refuse a pointer past 64 bits, or wrap a negative one)
            from ._config import shown

            raise InvalidArgumentError(f"stream={shown(handle)}; a CUstream handle must be in [0, {_MAX_HANDLE}]")
        return (handle or None) if device >= 0 else None
    if device < 0:
        return None
    if _raw_stream is None:
        import torch

        try:
            from torch._C import _cuda_getCurrentRawStream

            _raw_stream = _cuda_getCurrentRawStream
        except ImportError:  # pragma: no cover - older PyTorch
            _raw_stream = lambda index: torch.cuda.current_stream(index).cuda_stream
    return _raw_stream(device) or None


def wait(device, stream, event):
    """Makes the call's stream (`stream`, or PyTorch's current one on `device`) wait for `event`,
    a torch.cuda.Event recorded where the call's inputs are made. A CPU group's calls run at once:
    there is nothing to wait for."""
    if device == -1:
        return
    if not callable(getattr(event, "wait", None)):
        raise InvalidArgumentError(f"wait_event: a {type(event).__name__}; must be a torch.cuda.Event")
    torch_stream(device, stream).wait_event(event)


def torch_stream(device, stream=None):
    """The torch.cuda.Stream a call runs on: `stream`, or the current one of `device`; an int
    CUstream handle (which the calls take, raw_stream) as torch's ExternalStream over it (0: the
    device's default stream), for the events, waits and record_stream that follow the call."""
    import torch

    if stream is None:
        return torch.cuda.current_stream(device)
    if type(stream) is int:
        return torch.cuda.ExternalStream(stream, device=device) if stream else torch.cuda.default_stream(device)
    return stream


# The common calls' per-call arguments, adjacent epStacked_t written at once (one pack_into, not
# a word at a time: a decode loop's tensors are new each call, so their addresses change):
# a dispatch's topkIdx, inputTokens and topkWeights; a combine's expertOutputs, topkWeights,
# weightGradients, combinedTokens and topkWeightGradients (the first one or two: a virtual
# group's; all five: an NCCL rank's, and the torch ops' calls into their own outputs); and for
# those, a dispatch's receivedTokens to expertCounts.
_STACKED = struct.Struct("<QQq")   # one epStacked_t: address; type | device << 32; rank stride
_STACKED_2, _STACKED_3, _STACKED_5 = (struct.Struct("<" + "QQq" * n) for n in (2, 3, 5))
_DISPATCH_INPUTS = _abi.StackedDispatch.topkIdx.offset
_DISPATCH_OUTPUTS = _abi.StackedDispatch.receivedTokens.offset
_COMBINE_INPUTS = _abi.StackedCombine.expertOutputs.offset
if not ([getattr(_abi.StackedDispatch, name).offset for name in ("topkIdx", "inputTokens", "topkWeights")]
        == [_DISPATCH_INPUTS + i * _STACKED.size for i in range(3)]
        and [getattr(_abi.StackedDispatch, name).offset
             for name in ("receivedTokens", "receivedTopkIdx", "receivedTopkWeights", "receivedScales", "expertCounts")]
        == [_DISPATCH_OUTPUTS + i * _STACKED.size for i in range(5)]
        and [getattr(_abi.StackedCombine, name).offset
             for name in ("expertOutputs", "topkWeights", "weightGradients", "combinedTokens", "topkWeightGradients")]
        == [_COMBINE_INPUTS + i * _STACKED.size for i in range(5)]):
    raise AssertionError("epStackedDispatch_t / epStackedCombine_t: the common call's arguments are no longer adjacent")


class StackedCall:
    """One epStackedDispatch_t or epStackedCombine_t (the stacked calls: every rank's part of an
    argument in one array), made once per group and patched per call through a view of its
    8-byte words: an epStacked_t is three words (address; type | device << 32; rank stride)."""

    def __init__(self, cls, device):
        self.struct = _abi.new(cls)
        self.address = ctypes.addressof(self.struct)   # what the entry point takes (_library.addresses_entry)
        self.words = (ctypes.c_uint64 * (ctypes.sizeof(cls) // 8)).from_buffer(self.struct)
        self._bytes = memoryview(self.struct).cast("B")   # (the same memory, for pack_into)
        self.index = {name: getattr(cls, name).offset // 8 for name, kind in cls._fields_ if kind is _abi.Stacked}
        self._device = (device & 0xFFFFFFFF) << 32
        self._set = {}   # name -> (address, dtype, stride) as last written: a call's arguments mostly come back
        self._fields = None   # (tokens, direction, launch mode, phase, step) as last written
        self._call = None     # a common call's arguments as last written by dispatch_arguments() / combine_arguments()

    def set(self, name, address, dtype=0, stride=0):
        """Argument `name`: rank 0's part at `address` (0: not given), parts `stride` bytes apart (0: packed)."""
        key = (address, dtype, stride)
        if self._set.get(name) == key:
            return
        self._set[name] = key
        self._call = None
        i = self.index[name]
        words = self.words
        words[i] = address
        words[i + 1] = dtype | self._device
        words[i + 2] = stride

    def fields(self, tokens, direction, mode, phase, step):
        """The call's scalar fields (`tokens` None: a combine, which has none); written only where
        they differ from the last call's."""
        key = (tokens, direction, mode, phase, step)
        if key == self._fields:
            return
        self._call = None
        struct = self.struct
        if tokens is not None:
            struct.tokens = tokens
        struct.direction, struct.launchMode, struct.phase, struct.step = direction, mode, phase, step
        self._fields = key

    def dispatch_arguments(self, x, x_type, idx, idx_type, weights, tokens, phase, step):
        """A forward one-launch dispatch's per-call arguments (its three stacked inputs: tokens,
        topk_idx, float32 topk_weights; its token count, phase and step) at once: one comparison
        when they are the last call's."""
        key = (x, x_type, idx, idx_type, weights, tokens, phase, step)
        if key == self._call:
            return
        device = self._device   # (set() of the three, in one write)
        _STACKED_3.pack_into(self._bytes, _DISPATCH_INPUTS, idx, idx_type | device, 0, x, x_type | device, 0, weights, _abi.F32 | device, 0)
        self._set.clear()   # (set()'s record of what a field holds: unknown now, so its next call writes)
        if (tokens, 0, 0, phase, step) != self._fields:
            self.fields(tokens, 0, 0, phase, step)
        self._call = key

    def combine_arguments(self, outputs, element, weights, phase, step):
        """The same for a forward one-launch combine: its expert outputs, the dispatch's float32
        topk_weights (LL expert-major; None: the call's kind set them), phase and step."""
        key = (outputs, element, weights, phase, step)
        if key == self._call:
            return
        device = self._device   # (set() of the one or two, in one write)
        if weights is None:
            _STACKED.pack_into(self._bytes, _COMBINE_INPUTS, outputs, element | device, 0)
        else:
            _STACKED_2.pack_into(self._bytes, _COMBINE_INPUTS, outputs, element | device, 0, weights, _abi.F32 | device, 0)
        self._set.clear()   # (as dispatch_arguments)
        if (None, 0, 0, phase, step) != self._fields:
            self.fields(None, 0, 0, phase, step)
        self._call = key

    def rank_combine(self, outputs, element, weights, gradients, combined, combined_gradients, direction, phase, step):
        """An NCCL rank's combine (one part): every argument at once (addresses; 0: not given),
        one comparison when they are the last call's."""
        key = (outputs, element, weights, gradients, combined, combined_gradients, direction, phase, step)
        if key == self._call:
            return
        device = self._device   # (set() of the five, in one write)
        f32, typed = _abi.F32 | device, element | device
        _STACKED_5.pack_into(self._bytes, _COMBINE_INPUTS, outputs, typed, 0, weights, f32, 0, gradients, f32, 0, combined, typed, 0,
                             combined_gradients, f32, 0)
        self._set.clear()   # (as dispatch_arguments)
        if (None, direction, 0, phase, step) != self._fields:
            self.fields(None, direction, 0, phase, step)
        self._call = key

    def caller_dispatch(self, idx, idx_type, x, x_type, weights, received, element, received_idx, received_weights, counts,
                        tokens, direction, step):
        """A whole-phase, one-launch dispatch into the caller's stacked outputs (the torch ops'),
        every per-call argument at once: the three inputs (`idx` 0: none, a backward dispatch;
        `weights` 0: none), the received tokens, routing and counts (0: not given; receivedScales
        none), written as set() and clear() write them, in two writes."""
        device = self._device
        _STACKED_3.pack_into(self._bytes, _DISPATCH_INPUTS, idx, (idx_type if idx else 0) | device, 0, x, x_type | device, 0,
                             weights, (_abi.F32 if weights else 0) | device, 0)
        f32, i32 = _abi.F32 | device, _abi.I32 | device
        _STACKED_5.pack_into(self._bytes, _DISPATCH_OUTPUTS, received, element | device, 0, received_idx,
                             i32 if received_idx else device, 0, received_weights, f32 if received_weights else device, 0,
                             0, device, 0, counts, i32 if counts else device, 0)
        self._set.clear()   # (as dispatch_arguments)
        self._call = None
        if (tokens, direction, 0, _abi.PHASE_WHOLE, step) != self._fields:
            self.fields(tokens, direction, 0, _abi.PHASE_WHOLE, step)

    def caller_combine(self, outputs, element, weights, gradients, combined, combined_stride, combined_gradients,
                       gradients_stride, direction, step):
        """The same for a combine into the caller's stacked outputs: the expert outputs, the
        weights it applies and the weight gradients it takes (0: none), the combined tokens and
        weight gradients (0: none) `…_stride` bytes a rank apart."""
        device = self._device
        f32 = _abi.F32 | device
        _STACKED_5.pack_into(self._bytes, _COMBINE_INPUTS, outputs, element | device, 0, weights, f32 if weights else device, 0,
                             gradients, f32 if gradients else device, 0, combined, element | device, combined_stride,
                             combined_gradients, f32 if combined_gradients else device, gradients_stride)
        self._set.clear()   # (as dispatch_arguments)
        self._call = None
        if (None, direction, 0, _abi.PHASE_WHOLE, step) != self._fields:
            self.fields(None, direction, 0, _abi.PHASE_WHOLE, step)

    def clear(self, name):
        self.set(name, 0)
