"""Names for the public API's type hints.

Arrays are NumPy arrays (CPU backend) or PyTorch tensors (CPU, or CUDA on the GPU backends);
neither library is a dependency of the package, so an array is typed ``Any`` under the name
``Array``. Options are the literal strings they accept."""

from typing import Any, Literal, Optional, Sequence, Union

#: a NumPy array or a PyTorch tensor
Array = Any
#: one array per rank (a list, or any sequence), or one stacked ``[R, ...]`` array
PerRank = Union[Array, Sequence[Array]]

Algorithm = Literal["ll", "ht"]
Layout = Literal["expert_major", "rank_major", "flat", "expert_major_padded"]
Overflow = Literal["fail", "drop"]
Direction = Literal["forward", "backward"]
Launch = Literal["single", "per_rank"]
#: "bf16", "f16", "f32", "u8", their long names, or a NumPy / torch dtype
DType = Union[str, Any]
#: "cpu", "cuda" or "cuda:N" (VirtualGroup); an int, "cuda", "cuda:N", a torch.device or None (NCCLGroup)
Device = Union[str, int, Any, None]
Seconds = Union[int, float]
OptionalInt = Optional[int]

__all__ = ["Array", "PerRank", "Algorithm", "Layout", "Overflow", "Direction", "Launch", "DType", "Device",
           "Seconds", "OptionalInt"]
