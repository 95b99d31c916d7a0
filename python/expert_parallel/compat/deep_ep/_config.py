"""Config: DeepEP's tuning record for the high-throughput kernels, and the defaults per rank count."""

from __future__ import annotations

from ..._config import shown
from ...errors import InvalidArgumentError

_MAX_SMS = 2**31 - 2


class Config:
    """DeepEP's ``Config(num_sms, nvl_chunk_size, nvl_buffer_size, rdma_chunk_size, rdma_buffer_size)``.

    ``num_sms`` limits the GPU multiprocessors a high-throughput group uses (the CPU backend
    ignores it): an integer ≥ 2 here, and even where a dispatch or combine takes the config,
    which refuses an odd one, as DeepEP constructs any and asserts evenness at the call. The chunk and buffer sizes tune DeepEP's channel pipeline, which this
    library does not have: they are checked as DeepEP checks them (a config DeepEP refuses is
    refused by name), kept and not used. The size hints return 0: groups size their
    buffers from the shapes of the calls, so no byte count is needed up front."""

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256) -> None:
        self.num_sms = check_num_sms(num_sms, "num_sms", even=False)   # (the call checks evenness, as DeepEP's does)
        # The chunk sizes are checked as DeepEP's Config checks them (a config DeepEP refuses is
        # refused here too, by name), and kept: positive, each send chunk below its receive chunk,
        # the RDMA receive chunk rounded up to a multiple of its send chunk and at least twice it.
        nvl_send = _positive(num_max_nvl_chunked_send_tokens, "num_max_nvl_chunked_send_tokens")
        nvl_recv = _positive(num_max_nvl_chunked_recv_tokens, "num_max_nvl_chunked_recv_tokens")
        if nvl_send >= nvl_recv:
            raise InvalidArgumentError(f"num_max_nvl_chunked_send_tokens={nvl_send}; must be < num_max_nvl_chunked_recv_tokens "
                                       f"({nvl_recv}), as DeepEP requires")
        rdma_send = _positive(num_max_rdma_chunked_send_tokens, "num_max_rdma_chunked_send_tokens")
        rdma_recv = _positive(num_max_rdma_chunked_recv_tokens, "num_max_rdma_chunked_recv_tokens")
        rdma_recv = -(-rdma_recv // rdma_send) * rdma_send
        if 2 * rdma_send > rdma_recv:
            raise InvalidArgumentError(
                f"num_max_rdma_chunked_send_tokens={rdma_send}; must be ≤ half of num_max_rdma_chunked_recv_tokens (rounded up "
                f"to a multiple of the send chunk: {rdma_recv}), as DeepEP requires")
        self.num_max_nvl_chunked_send_tokens = nvl_send
        self.num_max_nvl_chunked_recv_tokens = nvl_recv
        self.num_max_rdma_chunked_send_tokens = rdma_send
        self.num_max_rdma_chunked_recv_tokens = rdma_recv

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0: no NVLink buffer is allocated up front (``num_nvl_bytes`` is not used)."""
        return 0

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0: there is no RDMA buffer (``num_rdma_bytes`` is not used)."""
        return 0

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, {self.num_max_nvl_chunked_send_tokens}, "
                f"{self.num_max_nvl_chunked_recv_tokens}, {self.num_max_rdma_chunked_send_tokens}, "
                f"{self.num_max_rdma_chunked_recv_tokens})")


def check_num_sms(value: object, name: str, even: bool = True) -> int:
    """`value` as an SM count: an even integer ≥ 2 (DeepEP's rule for the calls; `even` False:
    any integer in that range, as a Config is constructed)."""
    what = "an even integer" if even else "an integer"   # (a Config's: its calls ask for evenness)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name}={value!r}; must be {what} ≥ 2")
    if value < 2 or (even and value % 2) or value > _MAX_SMS:   # (the groups' multiprocessors field is 32 bits)
        raise InvalidArgumentError(f"{name}={shown(value)}; must be {what} in [2, {_MAX_SMS}]")
    return value


def _positive(value: object, name: str) -> int:
    """`value` as a chunk size: an integer ≥ 1 (below 2^31, DeepEP's int)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name}={value!r}; must be an integer ≥ 1")
    if not 1 <= value <= 2**31 - 1:
        raise InvalidArgumentError(f"{name}={shown(value)}; must be an integer in [1, {2**31 - 1}]")
    return value


def default_config(num_sms: int) -> Config:
    """The config DeepEP's get_dispatch_config / get_combine_config return: ``num_sms`` SMs."""
    return Config(num_sms)
