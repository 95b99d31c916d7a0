"""DeepEP's Config through compat.deep_ep: the chunk sizes are checked as DeepEP's Config checks
them (they tune a pipeline this library does not have, and are kept unused), so a config DeepEP
refuses is refused here too, by name, and one it takes is taken (its RDMA receive chunk rounded up
to a multiple of the send chunk, as DeepEP rounds it)."""

import pytest

import expert_parallel as ep
from expert_parallel.compat.deep_ep import Buffer, Config


def test_deepeps_own_configs_are_taken():
    # (the shapes of the configs DeepEP's get_dispatch_config / get_combine_config return)
    for chunks in [(6, 256, 6, 256), (24, 256, 6, 128), (10, 256, 6, 128), (6, 288, 20, 128), (4, 256, 6, 128)]:
        config = Config(24, *chunks)
        assert (config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens,
                config.num_max_rdma_chunked_send_tokens) == chunks[:3]
    assert Config(24, 6, 256, 6, 128).num_max_rdma_chunked_recv_tokens == 132   # rounded up to a multiple of 6
    assert Config(24, 6, 256, 100, 128).num_max_rdma_chunked_recv_tokens == 200   # 100 ≤ 200 / 2: DeepEP takes it
    assert Buffer.get_dispatch_config(8).num_sms == Buffer.num_sms


@pytest.mark.parametrize("chunks,message", [
    ((0, 256, 6, 256), r"^num_max_nvl_chunked_send_tokens=0; must be an integer in \[1, 2147483647\]"),
    ((6, -1, 6, 256), r"^num_max_nvl_chunked_recv_tokens=-1; must be an integer in \[1, "),
    ((6, 256, 0, 256), r"^num_max_rdma_chunked_send_tokens=0; must be an integer in \[1, "),
    ((6, 256, 6, 0), r"^num_max_rdma_chunked_recv_tokens=0; must be an integer in \[1, "),
    ((256, 256, 6, 256), r"^num_max_nvl_chunked_send_tokens=256; must be < num_max_nvl_chunked_recv_tokens \(256\)"),
    ((6, 256, 100, 50), r"^num_max_rdma_chunked_send_tokens=100; must be ≤ half of num_max_rdma_chunked_recv_tokens .*: 100\)"),
    ((6, 256, 6.0, 256), r"^num_max_rdma_chunked_send_tokens=6.0; must be an integer ≥ 1"),
    ((6, True, 6, 256), r"^num_max_nvl_chunked_recv_tokens=True; must be an integer ≥ 1"),
    ((6, 2**31, 6, 256), r"^num_max_nvl_chunked_recv_tokens=2147483648; must be an integer in \[1, 2147483647\]"),
])
def test_chunk_sizes_deepep_refuses_are_named(chunks, message):
    with pytest.raises(ep.InvalidArgumentError, match=message):
        Config(24, *chunks)


def test_an_odd_num_sms_is_taken_by_config_and_refused_by_the_call_that_uses_it():
    """DeepEP's Config takes any num_sms and its dispatch and combine assert it even (two blocks a
    channel): Config(21) was refused at construction here. It is now taken, and refused by name by
    the dispatch or combine given it, before anything moves; an even one runs."""
    import torch

    from expert_parallel.compat.deep_ep import run_ranks

    odd = Config(21)
    assert odd.num_sms == 21
    buffers = Buffer.virtual(1, timeout=30)
    x, idx, w = torch.ones(2, 8, dtype=torch.bfloat16), torch.tensor([[0, 1], [1, -1]]), torch.full((2, 2), 0.5)

    def dispatch(b, config):
        per_rank, _, per_expert, in_rank, _ = b.get_dispatch_layout(idx, 4)
        return b.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                          topk_idx=idx, topk_weights=w, config=config)

    with pytest.raises(ep.InvalidArgumentError, match=r"^config\.num_sms=21; must be an even integer in \[2, 2147483646\]$"):
        run_ranks(buffers, lambda b: dispatch(b, odd), timeout=30)
    recv_x, _, _, _, handle, _ = run_ranks(buffers, lambda b: dispatch(b, Config(20)), timeout=30)[0]
    with pytest.raises(ep.InvalidArgumentError, match=r"^config\.num_sms=21; must be an even integer in \[2, 2147483646\]$"):
        run_ranks(buffers, lambda b: b.combine(recv_x, handle, config=odd), timeout=30)
    combined = run_ranks(buffers, lambda b: b.combine(recv_x, handle, config=Config(20)), timeout=30)[0][0]
    assert torch.equal(combined, x)   # (HT: one row per token and rank, summed)
    for value in (0, 1, -2):   # (below 2: refused as constructed, as before)
        with pytest.raises(ep.InvalidArgumentError, match=rf"^num_sms={value}; must be an integer in \[2, "):
            Config(value)


def test_a_cached_dispatch_refuses_an_odd_num_sms_and_a_config_that_is_not_one():
    """DeepEP's dispatch asserts num_sms even before it looks at its handle, so its cached
    dispatch (the backward pass of combine) refuses Config(21) too; here that dispatch ignored
    its config altogether (a str was taken as well)."""
    import torch

    from expert_parallel.compat.deep_ep import run_ranks

    buffers = Buffer.virtual(1, timeout=30)
    x, idx, w = torch.ones(2, 8, dtype=torch.bfloat16), torch.tensor([[0, 1], [1, -1]]), torch.full((2, 2), 0.5)

    def dispatch(b):
        per_rank, _, per_expert, in_rank, _ = b.get_dispatch_layout(idx, 4)
        return b.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                          topk_idx=idx, topk_weights=w)

    handle = run_ranks(buffers, dispatch, timeout=30)[0][4]
    with pytest.raises(ep.InvalidArgumentError, match=r"^config\.num_sms=21; must be an even integer in \[2, 2147483646\]$"):
        run_ranks(buffers, lambda b: b.dispatch(x, handle=handle, config=Config(21)), timeout=30)
    with pytest.raises(ep.InvalidArgumentError, match=r"^config: a str; must be a Config"):
        run_ranks(buffers, lambda b: b.dispatch(x, handle=handle, config="20"), timeout=30)
    recv_x = run_ranks(buffers, lambda b: b.dispatch(x, handle=handle, config=Config(20)), timeout=30)[0][0]
    assert torch.equal(recv_x, run_ranks(buffers, lambda b: b.dispatch(x, handle=handle), timeout=30)[0][0])


def test_configs_num_sms_below_two_is_named_with_the_rule_config_applies():
    """Config takes an odd num_sms (its calls refuse one): the message for one below 2 said it must
    be even, which Config(3) shows it need not be."""
    assert Config(3).num_sms == 3
    for value in (0, 1, -2, 2**31):
        with pytest.raises(ep.InvalidArgumentError, match=rf"^num_sms={value}; must be an integer in \[2, 2147483646\]$"):
            Config(value)
    with pytest.raises(ep.InvalidArgumentError, match=r"^num_sms=2\.0; must be an integer ≥ 2$"):
        Config(2.0)
