"""epTensor_t descriptors of C-contiguous host NumPy arrays, for the tests that call the C ABI's
entry points directly."""

from expert_parallel import _abi


def host_tensor(array, dtype):
    """The epTensor_t of host array `array` (C-contiguous) as `dtype` (an epDataType_t)."""
    t = _abi.new(_abi.Tensor, data=array.ctypes.data, dtype=dtype, ndim=array.ndim, device=-1)
    stride = 1
    for i in reversed(range(array.ndim)):
        t.sizes[i], t.strides[i] = array.shape[i], stride
        stride *= array.shape[i]
    return t
