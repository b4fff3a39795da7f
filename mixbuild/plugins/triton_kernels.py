"""Triton kernels for MoE gating and the two grouped expert GEMMs.

Shape legend: T tokens, E experts, k top-k, H hidden, I intermediate, S = T * k slots,
M/N/K the GEMM tile dimensions (BLOCK_M rows of slots, BLOCK_N output channels, BLOCK_K reduction).

This module imports triton; import it through dispatch.py, which loads it lazily. Quantized layouts
are defined in formats.py. Weight scheme codes (constexpr SCHEME): 0 plain, 1 fp8, 2 int4.

Interpreter notes (TRITON_INTERPRET=1, used by the CPU test suite): the interpreter cannot multiply
bfloat16 tiles and rounds float32 -> e4m3 incorrectly, so the launchers set DOT_FP32 (upcast the
tile operands to float32 before tl.dot: products of bf16 values are exact in fp32) and EMULATE_FP8
(bit-exact round-to-nearest-even e4m3 conversion in integer arithmetic). On a GPU both are off for
16-bit inputs and the native instructions are used; float32 inputs always use IEEE float32 dots.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ------------------------------------------------------------------------------------- gating

@triton.jit
def moe_gate_kernel(logits_ptr, weights_ptr, ids_ptr, T, E, stride_t, stride_e,
                    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """router logits [T, E] -> weights f32 [T, TOP_K], ids i32 [T, TOP_K]; BLOCK_T rows a program.

    Softmax in float32; top-k by repeated arg-max where ties go to the lowest expert id (the order
    of a stable descending sort); optional renormalisation of the k chosen probabilities.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :] * stride_e
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    x = tl.where(col_ok[None, :], x, float("-inf"))
    peak = tl.max(x, axis=1)
    p = tl.exp(x - peak[:, None])
    p = tl.where(col_ok[None, :], p, 0.0)
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where(col_ok[None, :], p, -1.0)          # probabilities are >= 0: padding never wins
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    out_base = rows.to(tl.int64) * TOP_K
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)
        idx = tl.min(tl.where(p == best[:, None], cols[None, :], BLOCK_E), axis=1)
        tl.store(weights_ptr + out_base + j, best, mask=row_ok)
        tl.store(ids_ptr + out_base + j, idx.to(tl.int32), mask=row_ok)
        total += best
        p = tl.where(cols[None, :] == idx[:, None], -2.0, p)
    if NORMALIZE:
        for j in tl.static_range(TOP_K):
            w = tl.load(weights_ptr + out_base + j, mask=row_ok, other=0.0)
            tl.store(weights_ptr + out_base + j, w / total, mask=row_ok)


# ---------------------------------------------------------------------------- shared helpers

@triton.jit
def _tile_ids(num_blocks_m, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M row-tiles at a time for L2 reuse of B."""
    pid = tl.program_id(0)
    num_blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _expert_tile(pid_m, pid_n, N, num_slots, sorted_slots_ptr, block_expert_ptr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile (pid_m, pid_n) of a grouped GEMM: its expert, its slots (and which of them are real,
    not padding) and its output columns (and which are in range)."""
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    n_idx = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, slots, slots < num_slots, n_idx, n_idx < N


@triton.jit
def _load_b(b_base, n_idx, k_idx, n_ok, k_ok, stride_bn, stride_bk, s_base, stride_sn, stride_sk,
            group_size, SCHEME: tl.constexpr):
    """Weight tile B^T [BLOCK_K, BLOCK_N] of one expert: plain, fp8 (as e4m3) or int4 (as fp32)."""
    mask = k_ok[:, None] & n_ok[None, :]
    if SCHEME == 2:
        byte_ptrs = b_base + n_idx[None, :] * stride_bn + (k_idx[:, None] // 2) * stride_bk
        packed = tl.load(byte_ptrs, mask=mask, other=0).to(tl.int32)
        nibble = (packed >> ((k_idx[:, None] % 2) * 4)) & 0xF
        q = nibble - ((nibble & 8) << 1)             # two's complement nibble -> [-8, 7]
        s_ptrs = s_base + n_idx[None, :] * stride_sn + (k_idx[:, None] // group_size) * stride_sk
        scale = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
        tile = q.to(tl.float32) * scale
    else:
        tile = tl.load(b_base + n_idx[None, :] * stride_bn + k_idx[:, None] * stride_bk, mask=mask,
                       other=0)
        if SCHEME == 1:
            tile = tile.to(tl.float8e4nv, bitcast=True)
    return tile


@triton.jit
def _mma(a, b, acc, DOT_FP32: tl.constexpr):
    """acc += a @ b with a float32 accumulator (IEEE float32 when DOT_FP32)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _e4m3_bits(x, EMULATE: tl.constexpr):
    """float32 -> e4m3fn bit patterns (uint8): saturate to +-448, round to nearest even."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if EMULATE:
        bits = x.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        mag = bits & 0x7FFFFFFF
        # normal range (|x| >= 2^-6): keep 3 mantissa bits, RNE on the dropped 20, rebias 127 -> 7
        rounded = (mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20
        normal = rounded - (120 << 3)
        # subnormal range: multiples of 2^-9, RNE on |x| * 512 (exact in float32)
        y = tl.abs(x) * 512.0
        floor = y.to(tl.int32)
        frac = y - floor.to(tl.float32)
        up = (frac > 0.5) | ((frac == 0.5) & ((floor & 1) == 1))
        sub = floor + up.to(tl.int32)
        out = tl.where(mag >= (121 << 23), normal, sub) | sign
        return out.to(tl.uint8)
    return x.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


@triton.jit
def _quantize_a(a, a_scale, EMULATE: tl.constexpr):
    """Activation tile -> e4m3 with a static scale (float32 division, then RNE)."""
    return _e4m3_bits(a.to(tl.float32) / a_scale, EMULATE).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _fp8_channel_scale(s_base, n_idx, n_ok, stride_sn, PER_CHANNEL: tl.constexpr):
    """fp8 weight scale as a [BLOCK_N] vector: per output channel, or the expert's single scale."""
    if PER_CHANNEL:
        return tl.load(s_base + n_idx * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
    return tl.zeros(n_idx.shape, dtype=tl.float32) + tl.load(s_base).to(tl.float32)


# ------------------------------------------------------------------------------ grouped GEMMs

@triton.jit
def gate_up_kernel(
    a_ptr, b_ptr, c_ptr, b_scale_ptr, a_scale_ptr, c_scale_ptr,
    sorted_slots_ptr, block_expert_ptr, num_padded_ptr,
    num_blocks_m, N, K, num_slots, top_k, group_size,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_se, stride_sn, stride_sk, stride_ae, stride_ce,
    SCHEME: tl.constexpr, PER_CHANNEL: tl.constexpr, EMULATE_FP8: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """inter[s, n] = silu(x[s // k] . W[e, n]) * (x[s // k] . W[e, N + n]) for the slots of a tile.

    a: hidden [T, K=H]; b: w_gate_up [E, 2N, K] (N = I); c: intermediate [S, N], written in the
    activation dtype, or as e4m3 bits (quantized with c_scale) for fp8.
    """
    pid_m, pid_n = _tile_ids(num_blocks_m, N, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert, slots, row_ok, n_idx, n_ok = _expert_tile(pid_m, pid_n, N, num_slots, sorted_slots_ptr,
                                                      block_expert_ptr, BLOCK_M, BLOCK_N)
    tokens = (slots // top_k).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    b_base = b_ptr + expert * stride_be
    s_base = b_scale_ptr + expert * stride_se
    if SCHEME == 1:
        a_scale = tl.load(a_scale_ptr + expert * stride_ae).to(tl.float32)
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_idx = k0 + offs_k
        k_ok = k_idx < K
        a = tl.load(a_ptr + tokens[:, None] * stride_am + k_idx[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if SCHEME == 1:
            a = _quantize_a(a, a_scale, EMULATE_FP8)
        b_gate = _load_b(b_base, n_idx, k_idx, n_ok, k_ok, stride_bn, stride_bk, s_base,
                         stride_sn, stride_sk, group_size, SCHEME).to(a.dtype)
        b_up = _load_b(b_base, n_idx + N, k_idx, n_ok, k_ok, stride_bn, stride_bk, s_base,
                       stride_sn, stride_sk, group_size, SCHEME).to(a.dtype)
        acc_gate = _mma(a, b_gate, acc_gate, DOT_FP32)
        acc_up = _mma(a, b_up, acc_up, DOT_FP32)
    if SCHEME == 1:
        acc_gate *= a_scale * _fp8_channel_scale(s_base, n_idx, n_ok, stride_sn,
                                                 PER_CHANNEL)[None, :]
        acc_up *= a_scale * _fp8_channel_scale(s_base, n_idx + N, n_ok, stride_sn,
                                               PER_CHANNEL)[None, :]
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    c_ptrs = c_ptr + slots[:, None].to(tl.int64) * stride_cm + n_idx[None, :] * stride_cn
    c_mask = row_ok[:, None] & n_ok[None, :]
    if SCHEME == 1:
        c_scale = tl.load(c_scale_ptr + expert * stride_ce).to(tl.float32)
        tl.store(c_ptrs, _e4m3_bits(h / c_scale, EMULATE_FP8), mask=c_mask)
    else:
        tl.store(c_ptrs, h.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def down_kernel(
    a_ptr, b_ptr, c_ptr, b_scale_ptr, a_scale_ptr, routing_ptr,
    sorted_slots_ptr, block_expert_ptr, num_padded_ptr,
    num_blocks_m, N, K, num_slots, group_size,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_se, stride_sn, stride_sk, stride_ae,
    SCHEME: tl.constexpr, PER_CHANNEL: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[s, n] = routing[s] * (inter[s] . W[e, n]) for the slots of a tile.

    a: intermediate [S, K=I] (activation dtype, or e4m3 bits for fp8); b: w_down [E, N=H, K];
    c: y [S, N] in the activation dtype; routing: weights [S] float32.
    """
    pid_m, pid_n = _tile_ids(num_blocks_m, N, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert, slots, row_ok, n_idx, n_ok = _expert_tile(pid_m, pid_n, N, num_slots, sorted_slots_ptr,
                                                      block_expert_ptr, BLOCK_M, BLOCK_N)
    rows = slots.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    b_base = b_ptr + expert * stride_be
    s_base = b_scale_ptr + expert * stride_se
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_idx = k0 + offs_k
        k_ok = k_idx < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + k_idx[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0)
        if SCHEME == 1:
            a = a.to(tl.float8e4nv, bitcast=True)
        b = _load_b(b_base, n_idx, k_idx, n_ok, k_ok, stride_bn, stride_bk, s_base, stride_sn,
                    stride_sk, group_size, SCHEME).to(a.dtype)
        acc = _mma(a, b, acc, DOT_FP32)
    if SCHEME == 1:
        a_scale = tl.load(a_scale_ptr + expert * stride_ae).to(tl.float32)
        acc *= a_scale * _fp8_channel_scale(s_base, n_idx, n_ok, stride_sn, PER_CHANNEL)[None, :]
    routing = tl.load(routing_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    acc *= routing[:, None]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + n_idx[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
