"""moe_align: every slot exactly once, grouped by expert, padded per expert to BLOCK_M."""

from __future__ import annotations

import pytest
import torch

from mixbuild.plugins.align import align_capacity, moe_align


def check_alignment(ids: torch.Tensor, E: int, block_m: int) -> None:
    a = moe_align(ids, E, block_m)
    S = ids.numel()
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    total = int(padded.sum())
    assert a.num_padded.tolist() == [total]
    assert a.capacity == align_capacity(S, E, block_m) and a.capacity % block_m == 0
    assert a.capacity >= total
    slots = a.sorted_slots[:total]
    real = slots[slots < S].long()
    assert sorted(real.tolist()) == list(range(S))                  # every slot exactly once
    assert torch.all(a.sorted_slots[total:] == S)                   # tail is padding
    start = 0
    for e in range(E):                                              # groups in expert order
        group = slots[start:start + int(padded[e])]
        members = group[group < S].long()
        assert members.tolist() == torch.nonzero(flat == e).flatten().tolist()  # stable
        assert torch.all(group[int(counts[e]):] == S)               # padding after the members
        blocks = a.block_expert[start // block_m:(start + int(padded[e])) // block_m]
        assert torch.all(blocks == e)
        start += int(padded[e])
    assert torch.all(a.block_expert[total // block_m:] == -1)


@pytest.mark.parametrize("T, E, k, block_m", [(1, 4, 1, 16), (7, 5, 3, 16), (40, 8, 2, 16),
                                              (33, 3, 2, 32), (5, 8, 2, 64)])
def test_align_random_routing(T, E, k, block_m):
    gen = torch.Generator().manual_seed(T * 100 + E)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).int()
    check_alignment(ids, E, block_m)


def test_align_with_empty_experts_and_exact_multiples():
    ids = torch.tensor([[2, 0]] * 16, dtype=torch.int32)   # experts 1 and 3 empty, 16 slots each
    check_alignment(ids, 4, 16)
    a = moe_align(ids, 4, 16)
    assert a.num_padded.item() == 32
    assert a.block_expert[:2].tolist() == [0, 2]


def test_align_into_caller_buffers():
    ids = torch.tensor([[1, 0], [1, 2]], dtype=torch.int32)
    capacity = align_capacity(4, 3, 16)
    buffers = (torch.empty(capacity, dtype=torch.int32),
               torch.empty(capacity // 16, dtype=torch.int32), torch.empty(1, dtype=torch.int32))
    a = moe_align(ids, 3, 16, out=buffers)
    assert a.sorted_slots.data_ptr() == buffers[0].data_ptr()
    assert a.sorted_slots[[0, 1, 16, 17, 18, 32, 33]].tolist() == [1, 4, 0, 2, 4, 3, 4]
    assert a.block_expert.tolist()[:4] == [0, 1, 2, -1]
    check_alignment(ids, 3, 16)
