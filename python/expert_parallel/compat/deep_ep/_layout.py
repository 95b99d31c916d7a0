"""Plain torch computations of the adapter: DeepEP's dispatch layout, argument checks, element
types and FP8 scale formats."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from ... import _arrays
from ...errors import InvalidArgumentError

DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def torch_module() -> Any:
    import torch

    return torch


_GROUP_DTYPES: dict = {}   # torch dtype -> group element type, filled on first use


def group_dtype(tensor: Any, name: str) -> str:
    """The group element type of a token tensor: "bf16", "f16" or "f32"."""
    found = _GROUP_DTYPES.get(tensor.dtype)
    if found is None:
        text = str(tensor.dtype).replace("torch.", "")
        if text not in DTYPES:
            raise InvalidArgumentError(f"{name}: dtype {tensor.dtype}; must be torch.bfloat16, torch.float16 or torch.float32")
        found = _GROUP_DTYPES[tensor.dtype] = DTYPES[text]
    return found


_DEVICES: dict = {}   # a Buffer's device string -> (torch.device, any CUDA device will do)


def require_tensor(value: Any, name: str, ndim: int, device: str) -> Any:
    """`value` checked to be a torch tensor of `ndim` dimensions on `device`."""
    torch = torch_module()
    if not isinstance(value, torch.Tensor):
        raise InvalidArgumentError(f"{name}: a {type(value).__name__}; must be a torch.Tensor")
    if value.is_nested or value.layout is not torch.strided:   # (no sizes, storage or strides: torch's RuntimeError)
        what = "a nested tensor" if value.is_nested else f"a tensor of layout {value.layout}"
        raise InvalidArgumentError(f"{name}: {what}; must be a dense (torch.strided) torch.Tensor")
    if value.dim() != ndim:
        raise InvalidArgumentError(f"{name}: shape {list(value.shape)}; must have {ndim} dimensions")
    known = _DEVICES.get(device)
    if known is None:
        wanted = torch.device(device)
        known = _DEVICES[device] = (wanted, wanted.type == "cuda" and wanted.index is None)
    where = value.device
    if where != known[0] and not (known[1] and where.type == "cuda"):
        raise InvalidArgumentError(f"{name}: on {where}; this buffer's ranks are on {device}")
    return value


def require_contiguous(value: Any, name: str) -> Any:
    """`value` (a tensor) checked to be contiguous, as DeepEP asserts for the rows and the routing,
    and to hold its values in its memory (no negative view, no storage shrunk since: the
    library reads it by address), each named here by the caller's name (the library would name
    the per-rank list the adapter passes it, ``xs[0]``)."""
    if not value.is_contiguous():
        raise InvalidArgumentError(f"{name}: not contiguous (strides {tuple(value.stride())}); pass .contiguous()")
    error = _arrays.memory_error(value, name)
    if error is not None:
        raise error
    return value


def overlaps(a: Any, b: Any) -> bool:
    """Whether contiguous tensors `a` and `b` share a byte of memory (on one device)."""
    if a.device != b.device:
        return False
    a_start, b_start = a.data_ptr(), b.data_ptr()
    return a_start < b_start + b.numel() * b.element_size() and b_start < a_start + a.numel() * a.element_size()


def flag(value: Any, name: str) -> bool:
    """`value` as a bool: a bool, or 0 / 1 (as C-style callers pass); anything else is named."""
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    if type(value).__name__ in ("bool_", "bool") and getattr(value, "shape", None) == ():   # NumPy's bool scalars
        return bool(value)
    raise InvalidArgumentError(f"{name}={value!r} (type {type(value).__name__}); must be a bool")


def require_shape(value: Any, name: str, shape: Sequence[Optional[int]]) -> None:
    if not isinstance(value, torch_module().Tensor):
        raise InvalidArgumentError(f"{name}: a {type(value).__name__}; must be a torch.Tensor")
    got = list(value.shape)
    if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
        want = ", ".join("any" if w is None else str(w) for w in shape)
        raise InvalidArgumentError(f"{name}: shape {got}; must be [{want}]")


def routing(topk_idx: Any, num_experts: int, device: str, name: str = "topk_idx") -> Any:
    """`topk_idx` checked: ``[tokens, top_k]`` int32 or int64 on `device` (entries are checked by the library)."""
    torch = torch_module()
    require_tensor(topk_idx, name, 2, device)
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise InvalidArgumentError(f"{name}: dtype {topk_idx.dtype}; must be torch.int64 (deep_ep.topk_idx_t) or torch.int32")
    return require_contiguous(topk_idx, name)


def dispatch_layout(topk_idx: Any, num_experts: int, num_ranks: int) -> Tuple[Any, Any, Any]:
    """DeepEP's layout of a routing: tokens per rank ``[R]``, tokens per expert ``[E]`` (int32) and
    ``is_token_in_rank [B, R]`` (bool), where a token counts once per rank holding any of its experts."""
    torch = torch_module()
    tokens = topk_idx.shape[0]
    local = num_experts // num_ranks
    # Ids outside [0, E) count nowhere here (no host synchronisation to look at them): the
    # dispatch that follows checks every id and names a bad one.
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    experts = torch.where(valid, topk_idx, 0).long()
    hits = torch.zeros((tokens, num_experts), dtype=torch.int32, device=topk_idx.device)
    per_expert = hits.scatter_add_(1, experts, valid.to(torch.int32)) > 0   # -1 entries add 0 to column 0
    in_rank = per_expert.view(tokens, num_ranks, local).any(dim=2)
    return (in_rank.sum(dim=0, dtype=torch.int32), per_expert.sum(dim=0, dtype=torch.int32), in_rank)


def align(counts: List[int], alignment: int) -> List[int]:
    """Each count rounded up to a multiple of `alignment`."""
    return [(c + alignment - 1) // alignment * alignment for c in counts]


def exponents_to_float(words: Any, blocks: int) -> Any:
    """UE8M0 scales (int32 words of four exponent bytes, block j in byte j % 4 of word j // 4) as the
    float32 powers of two they stand for, ``[..., blocks]``."""
    torch = torch_module()
    raw = words.contiguous().view(torch.uint8)[..., :blocks].to(torch.int32)
    return (raw << 23).view(torch.float32)
