"""moe_align: group token-slots by expert, each group padded to a multiple of the GEMM block.

Shape legend: T tokens, E experts, k top-k, S = T * k slots (slot s = token s // k, choice s % k),
M = BLOCK_M rows per GEMM tile.

The grouped GEMMs process one tile of M consecutive entries of `sorted_slots` per program; every
tile belongs to exactly one expert (`block_expert`). Padding entries hold the sentinel S and are
masked out. Buffers have a fixed worst-case size (S + E * (M - 1) entries), and nothing here reads
a value back to the host, so the whole pipeline can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Alignment:
    """The slot schedule of one MoE call.

    sorted_slots  int32 [capacity]  slot ids grouped by expert (stable: ascending slot within an
                                    expert), each group padded with S up to a multiple of M
    block_expert  int32 [capacity // M]  expert of each tile; -1 past the last used tile
    num_padded    int32 [1]         total used entries (sum over experts of the padded counts)
    block_m       int               M
    num_slots     int               S
    """

    sorted_slots: Tensor
    block_expert: Tensor
    num_padded: Tensor
    block_m: int
    num_slots: int

    @property
    def capacity(self) -> int:
        return self.sorted_slots.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]


def align_capacity(num_slots: int, num_experts: int, block_m: int) -> int:
    """Worst-case padded length: S + E * (M - 1), rounded up to a multiple of M."""
    worst = num_slots + num_experts * (block_m - 1)
    return -(-worst // block_m) * block_m


def moe_align(expert_ids: Tensor, num_experts: int, block_m: int,
              out: tuple[Tensor, Tensor, Tensor] | None = None) -> Alignment:
    """expert_ids [T, k] (ids in [0, E)) -> Alignment for tiles of `block_m` rows.

    `out` optionally supplies (sorted_slots, block_expert, num_padded) buffers of the sizes given
    by align_capacity (for callers that own a workspace, such as the TensorRT plugin).
    """
    device = expert_ids.device
    flat = expert_ids.reshape(-1).long()
    num_slots = flat.numel()
    capacity = align_capacity(num_slots, num_experts, block_m)

    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    group_start = torch.cumsum(counts, 0) - counts

    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(num_slots, device=device) - group_start[expert_of]
    dest = padded_start[expert_of] + rank

    sorted_slots, block_expert, num_padded = out if out is not None else (
        torch.empty(capacity, dtype=torch.int32, device=device),
        torch.empty(capacity // block_m, dtype=torch.int32, device=device),
        torch.empty(1, dtype=torch.int32, device=device))
    sorted_slots.fill_(num_slots)
    sorted_slots.scatter_(0, dest, order.to(torch.int32))

    tile_start = torch.arange(0, capacity, block_m, device=device)
    owner = torch.searchsorted(padded_end, tile_start, right=True)
    block_expert.copy_(torch.where(owner < num_experts, owner, -1))
    num_padded.copy_(padded_end[-1:])
    return Alignment(sorted_slots, block_expert, num_padded, block_m, num_slots)
