"""ep.NCCLGroup where no GPU is needed: the ABI version, arguments checked and named before any
library is asked, a clean error naming what is missing where NCCL or CUDA is absent, and the
unique id's way from rank 0 to the others (a stand-in for torch.distributed)."""

import ctypes

import pytest

import expert_parallel as ep
from expert_parallel import _abi
from expert_parallel._library import load
from expert_parallel.nccl_group import _share_unique_id


def unique_id():
    """A real id where NCCL is present, else zeros (creating a group fails before using it)."""
    try:
        return ep.nccl_unique_id()
    except ep.NcclError:
        return bytes(_abi.NCCL_UNIQUE_ID_BYTES)


def settings(**overrides):
    values = dict(experts=4, hidden=8, top_k=2, max_tokens=2, dtype="f32", rank=0, ranks=1, unique_id=bytes(128),
                  device=0)
    values.update(overrides)
    return values


def test_the_library_speaks_this_abi_version():
    version = ctypes.c_int32()
    assert load().epGetAbiVersion(ctypes.byref(version)) == _abi.SUCCESS
    assert version.value == _abi.ABI_VERSION == 8


def test_nccl_error_is_an_expert_parallel_error():
    assert issubclass(ep.NcclError, ep.ExpertParallelError)
    assert issubclass(ep.NcclError, RuntimeError)
    assert ep.NcclError.status == _abi.NCCL_ERROR


def test_unique_id_is_128_bytes_or_an_error_naming_libnccl():
    try:
        value = ep.nccl_unique_id()
    except ep.NcclError as error:
        assert "epGetNCCLUniqueId: libnccl.so.2 is not available" in str(error)
    else:
        assert isinstance(value, bytes) and len(value) == 128


@pytest.mark.parametrize("overrides,match", [
    (dict(rank=2, ranks=2, experts=4), r"invalid argument: rank = 2; must be in 0..<2 \(ranks\)"),
    (dict(rank=-1), r"rank=-1; must be in \[0, "),
    (dict(rank="0"), r"rank='0'; must be an integer"),
    (dict(unique_id=b"12345"), r"unique_id: 5 bytes; must be the 128 bytes of nccl_unique_id\(\) from rank 0"),
    (dict(unique_id="ab" * 64), r"unique_id: a str; must be the 128 bytes"),
    (dict(device="cpu"), r"device='cpu'; must be a CUDA device"),
    (dict(device=-1), r"device=-1; must be in \[0, "),
    (dict(init_timeout=-1.0), r"invalid argument: init_timeout = -1.0; must be in \(0, 1e6\]"),
    (dict(init_timeout="soon"), r"init_timeout='soon'; must be a number of seconds"),
    (dict(multiprocessors=0), r"multiprocessors=0; must be in \[1, "),
    (dict(ranks=2, experts=5), r"experts = 5; must be a multiple of ranks \(2\)"),
    (dict(ranks=33, experts=33, rank=0), r"ranks = 33; must be ≤ 32 on the GPU backend"),
    (dict(algorithm="ht", layout="rank_major"), r"layout = 'rank_major'; is not a layout of algorithm 'ht'"),
    (dict(dtype="int8"), r"dtype='int8'"),
])
def test_arguments_are_checked_before_nccl_or_cuda_is_needed(overrides, match):
    with pytest.raises(ep.InvalidArgumentError, match=match):
        ep.NCCLGroup(**settings(**overrides))


def test_without_nccl_or_cuda_creating_a_group_names_what_is_missing(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")  # where NCCL is: never NVLink multicast
    try:
        group = ep.NCCLGroup(**settings(unique_id=unique_id()))
    except ep.NcclError as error:
        assert "epGroupCreateNCCL: libnccl.so.2 is not available" in str(error)
    except ep.CudaError as error:
        assert "epGroupCreateNCCL" in str(error) and "libcuda" in str(error)
    else:  # NCCL and a GPU: a group of one rank needs no other process
        with group:
            assert (group.rank, group.ranks, group.recv_shape) == (0, 1, (4, 2, 8))


class StandIn:
    """torch.distributed's broadcast_object_list between two ranks in one process: rank 0's call
    records what it sent, rank 1's call receives it."""

    def __init__(self, sent=None):
        self.sent = sent

    def get_global_rank(self, group, rank):
        assert (group, rank) == ("pg", 0)
        return 0

    def broadcast_object_list(self, objects, src, group):
        assert (src, group) == (0, "pg")
        if self.sent is None:
            self.sent = list(objects)
        else:
            objects[:] = self.sent


def test_rank_0_shares_its_unique_id_or_its_error_with_every_rank():
    rank0 = StandIn()
    try:
        sent = _share_unique_id(rank0, "pg", 0)
    except ep.NcclError as error:
        with pytest.raises(ep.NcclError, match="rank 0 could not make the NCCL unique id: .*libnccl.so.2") as raised:
            _share_unique_id(StandIn(rank0.sent), "pg", 1)
        assert raised.value.status == error.status == _abi.NCCL_ERROR
    else:
        assert _share_unique_id(StandIn(rank0.sent), "pg", 1) == sent


def test_other_ranks_take_the_id_rank_0_broadcast():
    assert _share_unique_id(StandIn([("id", b"\x07" * 128)]), "pg", 1) == b"\x07" * 128
