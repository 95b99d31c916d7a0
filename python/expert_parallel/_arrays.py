"""NumPy arrays and PyTorch tensors as epTensor_t descriptors, checked first, so that a wrong
argument raises an error naming it rather than reaching the library."""

import contextlib
import ctypes
import math
import sys

from . import _abi
from .errors import InvalidArgumentError, OutOfMemoryError

_NUMPY_DTYPES = {"float16": _abi.F16, "float32": _abi.F32, "int32": _abi.I32, "int64": _abi.I64,
                 "uint8": _abi.U8, "bfloat16": _abi.BF16}
_TORCH_DTYPES = {"torch.bfloat16": _abi.BF16, "torch.float16": _abi.F16, "torch.float32": _abi.F32,
                 "torch.int32": _abi.I32, "torch.int64": _abi.I64, "torch.uint8": _abi.U8,
                 "torch.float8_e4m3fn": _abi.E4M3}
_DTYPE_ALIASES = {"bf16": _abi.BF16, "bfloat16": _abi.BF16, "f16": _abi.F16, "float16": _abi.F16, "half": _abi.F16,
                  "f32": _abi.F32, "float32": _abi.F32, "float": _abi.F32, "u8": _abi.U8, "uint8": _abi.U8,
                  "torch.bfloat16": _abi.BF16, "torch.float16": _abi.F16, "torch.float32": _abi.F32, "torch.uint8": _abi.U8}


def element_type(dtype):
    """The payload type a group is created with: "bf16", "f16", "f32", "u8" or a NumPy/torch dtype."""
    key = dtype if isinstance(dtype, str) else str(dtype)
    if key not in _DTYPE_ALIASES:
        name = getattr(dtype, "name", None)  # a NumPy dtype
        if name is None and isinstance(dtype, type) and dtype.__module__ == "numpy":
            name = dtype.__name__  # a NumPy scalar type (np.float32)
        key = name if name in _DTYPE_ALIASES else key
    if key not in _DTYPE_ALIASES:
        raise InvalidArgumentError(f"dtype={dtype!r}; must be 'bf16', 'f16', 'f32' or 'u8' (or the NumPy/torch dtype)")
    return _DTYPE_ALIASES[key]


_KINDS = {}   # type -> "torch", "numpy" or None, found once per type


def kind(value):
    """"torch" for a PyTorch tensor, "numpy" for a NumPy array, None otherwise."""
    cls = type(value)
    try:
        return _KINDS[cls]
    except KeyError:
        pass
    # A subclass defined elsewhere (a user's torch.Tensor or numpy.ndarray subclass) is its base's kind.
    bases = {(base.__module__, base.__name__) for base in cls.__mro__}
    if (cls.__module__.startswith("torch") and hasattr(cls, "data_ptr")) or ("torch", "Tensor") in bases:
        found = "torch"
    elif (cls.__module__ == "numpy" and hasattr(cls, "__array_interface__")) or ("numpy", "ndarray") in bases:
        found = "numpy"
    else:
        found = None
    _KINDS[cls] = found
    return found


def is_torch(value):
    return kind(value) == "torch"


def outside_inference_mode(like):
    """A context in which the torch tensors made are normal tensors, also under
    torch.inference_mode (a null context for anything else). For buffers a group keeps for later
    calls, made by a first call that may run under inference_mode: inference tensors cannot be
    updated in place outside inference mode, nor saved by autograd, while normal tensors serve
    calls in either mode."""
    if is_torch(like):
        torch = sys.modules["torch"]
        if torch.is_inference_mode_enabled():
            return torch.inference_mode(False)
    return contextlib.nullcontext()


def is_numpy(value):
    return kind(value) == "numpy"


def ep_dtype(value, expected):
    """The epDataType_t of an array; uint16 NumPy arrays hold raw bf16 bits where bf16 is expected,
    uint8 arrays (and tensors) the codes of e4m3 where e4m3 is expected."""
    if is_torch(value):
        code = _TORCH_DTYPES.get(str(value.dtype))
        return _abi.E4M3 if code == _abi.U8 and _abi.E4M3 in expected and _abi.U8 not in expected else code
    name = value.dtype.name
    if name == "uint16" and _abi.BF16 in expected:
        return _abi.BF16
    if name == "uint8" and _abi.E4M3 in expected:
        return _abi.E4M3
    return _NUMPY_DTYPES.get(name)


def device_of(value):
    """-1 for host memory, the CUDA ordinal for device memory, None for other devices."""
    if is_torch(value):
        device = value.device
        if device.type == "cpu":
            return -1
        if device.type == "cuda":
            return device.index if device.index is not None else 0
        return None
    return -1


def describe_device(ordinal):
    return "cpu" if ordinal == -1 else f"cuda:{ordinal}"


def describe_dtype(value):
    return str(value.dtype)


def writable(value):
    """Whether the library may write `value`: not a read-only NumPy array (a torch tensor is
    writable; anything else is named by :func:`tensor`)."""
    return kind(value) != "numpy" or bool(value.flags.writeable)


def dense(value, name):
    """Raises the error naming `value` (a torch tensor) unless it is a dense (strided) tensor: a
    sparse or nested one has no storage, sizes or strides (torch raises its own RuntimeError), and
    a torch.func wrapper has no memory of its own (torch's "Cannot access data pointer"), nor have
    a tracing tensor (:func:`traced`), a wrapper subclass or a zero tensor (data_ptr() 0)."""
    if value.is_nested:
        raise InvalidArgumentError(f"{name}: a nested tensor; must be a dense (torch.strided) tensor")
    if str(value.layout) != "torch.strided":
        raise InvalidArgumentError(f"{name}: layout {value.layout}; must be a dense (torch.strided) tensor: pass .to_dense()")
    if _functorch_wrapped(value):
        raise InvalidArgumentError(
            f"{name}: a torch.func wrapper (a tensor of grad, vmap, jacrev, functionalize, ..., or one left over from a finished "
            "transform), which has no memory of its own; must be a plain tensor: call outside the transform, or "
            "pass .detach() of one left over")
    tracing = traced(value)
    if tracing is not None:
        raise InvalidArgumentError(
            f"{name}: {tracing}, which has no memory the library could read or write; must be a plain tensor: the group's "
            "calls run on real tensors, so call them outside the tracing (under torch.compile, call the ops of "
            "expert_parallel.torch, whose fake implementations trace)")
    plain = type(value) is sys.modules["torch"].Tensor
    if (not plain or value._is_zerotensor()) and value.device.type != "meta" and value.numel() and not value.data_ptr():
        if plain:   # (a zero tensor: what autograd may hand a backward for a gradient known to be zero)
            raise InvalidArgumentError(
                f"{name}: a zero tensor (torch._efficientzerotensor) with no memory of its own (data_ptr() is 0); must be a "
                "tensor whose storage holds its values: pass torch.zeros of its shape")
        raise InvalidArgumentError(
            f"{name}: a {type(value).__name__} with no memory of its own (a wrapper tensor subclass: data_ptr() is 0); "
            "must be a tensor whose storage holds its values: pass a plain tensor")
    return value


def traced(value):
    """What torch tensor `value` is where it is a tracing tensor with no memory of its own (a
    FakeTensor of torch.compile or FakeTensorMode, a functional tensor of torch.func.functionalize
    or of torch.compile's tracing), or None."""
    import torch

    fake = getattr(sys.modules.get("torch._subclasses.fake_tensor"), "FakeTensor", None)
    if fake is not None and isinstance(value, fake):
        return "a FakeTensor (torch.compile's tracing, FakeTensorMode)"
    # torch.compile's and torch.export's functionalization wraps its tensors in the Python subclass
    # FunctionalTensor, for which torch._is_functional_tensor is False (its inner tensor's is True).
    wrapper = getattr(sys.modules.get("torch._subclasses.functional_tensor"), "FunctionalTensor", None)
    functional = getattr(torch, "_is_functional_tensor", None)
    if wrapper is not None and isinstance(value, wrapper) or functional is not None and functional(value):
        return "a functional tensor (torch.func.functionalize, torch.compile's tracing)"
    return None


def _functorch_wrapped(value):
    """Whether torch tensor `value` is a torch.func (functorch) wrapper, live or dead."""
    import torch

    test = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return test is not None and test(value)


def extent(value):
    """The bytes of torch tensor `value`'s storage its elements span, from its first (data_ptr())
    to past its last: every stride's reach plus one element; 0 for no elements."""
    if value.numel() == 0:
        return 0
    return (sum((n - 1) * s for n, s in zip(value.shape, value.stride())) + 1) * value.element_size()


def storage_error(value, name):
    """The error naming torch tensor `value` (dense) whose storage ends before its last element
    (shrunk since the tensor was made: ``untyped_storage().resize_()``), which the library would
    read or write past (and a copy read past), or None."""
    reach = extent(value)
    needed = value.storage_offset() * value.element_size() + reach
    held = value.untyped_storage().nbytes()
    if reach and needed > held:
        return InvalidArgumentError(
            f"{name}: storage of {held} bytes; must hold the {needed} bytes its elements reach (storage_offset() "
            f"{value.storage_offset()}, shape {list(value.shape)}, strides {tuple(value.stride())}, {value.element_size()}-byte "
            "elements): its storage was shrunk (untyped_storage().resize_()) since the tensor was made")
    return None


def memory_error(value, name, output=False):
    """The error naming torch tensor `value` (dense) where the library, which reads and writes it
    by address, would not find its values in its memory, or None: a storage too small for it
    (:func:`storage_error`), or a negative view (``is_neg()``: ``torch._neg_view``, the ``.imag``
    of a conjugate view), whose memory holds its values negated, which torch undoes as it reads
    them and the library would not. An input may be resolved (``.resolve_neg()``, a copy); an
    output (`output`) cannot: the call would write the copy. (A conjugate view, ``is_conj()``, is
    complex: refused by its dtype before this is asked.)"""
    error = storage_error(value, name)
    if error is None and value.is_neg():
        advice = ("the call writes its memory, which the tensor reads negated: pass a tensor of its own" if output
                  else "its memory holds the values negated, which the library would read as they are: pass .resolve_neg()")
        error = InvalidArgumentError(f"{name}: a negative view (is_neg() is True); must be False: {advice}")
    return error


def tensor(value, name, *, dtypes, device, shape, writable=False):
    """The epTensor_t of `value` after checking its type, dtype, device, contiguity and shape.

    `dtypes`: the accepted epDataType_t values; `device`: -1 (host) or a CUDA ordinal; `shape`: a
    tuple whose None entries accept any size; `writable`: an output, which a read-only NumPy array
    cannot be.
    """
    if kind(value) is None:
        raise InvalidArgumentError(f"{name}: a {type(value).__name__}; must be a NumPy array or a PyTorch tensor")
    if is_torch(value):
        dense(value, name)
    if writable and kind(value) == "numpy" and not value.flags.writeable:
        raise InvalidArgumentError(f"{name}: a read-only NumPy array (flags.writeable is False); the call writes it: pass a writable array")
    dtype = ep_dtype(value, dtypes)
    if dtype not in dtypes:
        wanted = " or ".join(_abi.DTYPE_NAMES[d] for d in sorted(dtypes))
        raise InvalidArgumentError(f"{name}: dtype {describe_dtype(value)}; must be {wanted}")
    if not is_torch(value) and not value.dtype.isnative:
        order = "big-endian" if value.dtype.byteorder == ">" else "little-endian"
        raise InvalidArgumentError(
            f"{name}: byte order {order} (dtype {value.dtype.str!r}); must be the machine's native byte order "
            f"({sys.byteorder}-endian): pass value.astype(value.dtype.newbyteorder('='))")
    where = device_of(value)
    if where != device:
        raise InvalidArgumentError(
            f"{name}: on {value.device if is_torch(value) else 'cpu (NumPy)'}; must be on {describe_device(device)}")
    sizes = tuple(int(s) for s in value.shape)
    if len(sizes) != len(shape) or any(want is not None and want != got for want, got in zip(shape, sizes)):
        wanted = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise InvalidArgumentError(f"{name}: shape {list(sizes)}; must be {wanted}")
    if is_torch(value):
        if not value.is_contiguous():
            raise InvalidArgumentError(f"{name}: not contiguous (strides {tuple(value.stride())}); pass .contiguous()")
        error = memory_error(value, name, writable)
        if error is not None:
            raise error
        strides = tuple(int(s) for s in value.stride())
        data = value.data_ptr()
    else:
        if not value.flags["C_CONTIGUOUS"]:
            raise InvalidArgumentError(f"{name}: not C-contiguous (strides {value.strides} bytes); pass numpy.ascontiguousarray(...)")
        if not value.flags["ALIGNED"]:
            raise InvalidArgumentError(f"{name}: not aligned to its element size")
        strides = tuple(int(s) // value.itemsize for s in value.strides)
        data = value.__array_interface__["data"][0]
    if len(sizes) > _abi.MAX_DIMS:
        raise InvalidArgumentError(f"{name}: {len(sizes)} dimensions; at most {_abi.MAX_DIMS}")
    descriptor = _abi.new(_abi.Tensor, data=data or None, dtype=dtype, ndim=len(sizes), device=device)
    for i, (size, stride) in enumerate(zip(sizes, strides)):
        descriptor.sizes[i] = size
        descriptor.strides[i] = stride
    return descriptor


def pointer(descriptor):
    """A pointer to a descriptor, or NULL for None."""
    return ctypes.pointer(descriptor) if descriptor is not None else None


def describe_bytes(count):
    """``count`` bytes for a message: the exact number and a binary-prefixed size."""
    size, unit = float(count), "B"
    for prefix in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"):
        if size < 1024:
            break
        size, unit = size / 1024, prefix
    return f"{count} bytes" if unit == "B" else f"{count} bytes ({size:.1f} {unit})"


def buffer_error(name, shape, ep_type, cause, hint=None):
    """The :class:`OutOfMemoryError` for buffer `name` of `shape` elements of `ep_type`."""
    count = math.prod(int(s) for s in shape) * _abi.DTYPE_SIZES[ep_type]
    reason = f": {cause}" if cause else ""
    advice = f"; {hint}" if hint else ""
    return OutOfMemoryError(
        f"{name}: {list(shape)} {_abi.DTYPE_NAMES[ep_type]} needs {describe_bytes(count)}, which could not be "
        f"allocated{reason}{advice}")


def fixed_alias(array):
    """An alias of `array` (which the caller keeps) whose memory cannot be moved through it: a
    torch tensor over a storage that cannot be resized (through DLPack, as torch shares memory
    it does not own), or a NumPy view, which cannot be resized."""
    if is_torch(array):
        from torch.utils import dlpack

        try:
            return dlpack.from_dlpack(dlpack.to_dlpack(array))
        except (RuntimeError, TypeError, BufferError):   # (a type DLPack does not take: float8 before torch 2.7)
            import torch

            return dlpack.from_dlpack(dlpack.to_dlpack(array.view(torch.uint8))).view(array.dtype)
    return array.view()


def _is_out_of_memory(error):
    """Whether a torch allocation's RuntimeError is a failure to find the memory."""
    text = str(error).lower()
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in text or "alloc" in text


class Allocator:
    """Makes output arrays like a reference input: NumPy arrays, or torch tensors on its device.

    A buffer that cannot be allocated raises :class:`OutOfMemoryError` naming it and its bytes.

    ``fixed=True`` makes a buffer the group keeps and whose address the library keeps: a buffer
    slot's. The caller gets an alias whose memory cannot move (a torch storage that cannot be
    resized, a NumPy array that does not own its data), and the allocator keeps the memory
    itself in ``kept``: a result's tensor that a caller resizes, rebinds (``.data =``,
    ``set_()``) or drops never frees the address the next dispatch writes."""

    def __init__(self, like):
        self.like = like
        self.torch = is_torch(like)
        self.kept: list = []

    def zeros(self, shape, ep_type, like_dtype=None, *, name="output", hint=None, fixed=False):
        try:
            array = self._zeros(shape, ep_type, like_dtype)
            if fixed:
                self.kept.append(array)
                array = fixed_alias(array)
            return array
        except MemoryError as error:
            raise buffer_error(name, shape, ep_type, str(error), hint) from error
        except ValueError as error:  # NumPy: "array is too big", "maximum supported dimension"
            if self.torch:
                raise
            raise buffer_error(name, shape, ep_type, str(error), hint) from error
        except RuntimeError as error:  # torch: DefaultCPUAllocator / CUDA out of memory
            if not self.torch or not _is_out_of_memory(error):
                raise
            raise buffer_error(name, shape, ep_type, str(error).splitlines()[0], hint) from error

    def _zeros(self, shape, ep_type, like_dtype):
        if self.torch:
            import torch

            dtypes = {_abi.BF16: torch.bfloat16, _abi.F16: torch.float16, _abi.F32: torch.float32,
                      _abi.I32: torch.int32, _abi.I64: torch.int64, _abi.U8: torch.uint8,
                      _abi.E4M3: getattr(torch, "float8_e4m3fn", torch.uint8)}
            return torch.zeros(shape, dtype=dtypes[ep_type], device=self.like.device)
        import numpy

        if like_dtype is not None:
            return numpy.zeros(shape, dtype=like_dtype)
        dtypes = {_abi.F16: numpy.float16, _abi.F32: numpy.float32, _abi.I32: numpy.int32,
                  _abi.I64: numpy.int64, _abi.U8: numpy.uint8, _abi.BF16: numpy.uint16, _abi.E4M3: numpy.uint8}
        return numpy.zeros(shape, dtype=dtypes[ep_type])
