"""register_cuda_kernels: registration on a CPU-only build, and the CUDA entry points' math."""

from __future__ import annotations

import torch

from mixbuild.model.ops import experts_reference, gate_reference
from mixbuild.plugins import dispatch
from tests.plugins.helpers import expert_weights, needs_triton

pytestmark = needs_triton


def test_register_is_idempotent_and_keeps_cpu_on_the_reference(gen, monkeypatch):
    assert dispatch.register_cuda_kernels() is True
    assert dispatch.register_cuda_kernels() is True
    called = []
    monkeypatch.setattr(dispatch, "moe_gate_triton", lambda *a, **k: called.append(a))
    logits = torch.randn(4, 6, generator=gen)
    weights, ids = torch.ops.mixbuild.moe_gate(logits, 2, True)
    assert not called                                        # CPU tensors: reference kernel
    want = gate_reference(logits, 2, True)
    assert torch.equal(ids, want[1]) and torch.equal(weights, want[0])


def test_disable_switch(monkeypatch):
    monkeypatch.setattr(dispatch, "_registered", False)
    monkeypatch.setenv(dispatch.DISABLE_ENV, "1")
    assert dispatch.register_cuda_kernels() is False


def test_cuda_entry_points_compute_the_op(gen):
    # the functions registered for CUDA, run here on CPU tensors through the interpreter
    logits = torch.randn(5, 4, generator=gen)
    weights, ids = dispatch._moe_gate_cuda(logits, 2, True)
    assert torch.equal(ids, gate_reference(logits, 2, True)[1])
    w_gate_up, w_down = expert_weights(4, 32, 48, gen)
    x = torch.randn(5, 32, generator=gen)
    out = dispatch._moe_experts_cuda(x, weights, ids, w_gate_up, w_down)
    torch.testing.assert_close(out, experts_reference(x, weights, ids, w_gate_up, w_down),
                               rtol=1e-5, atol=1e-5)


def test_interpreter_flag_is_seen():
    assert dispatch.interpreting()


def test_workspace_bytes_of_a_concrete_shape():
    # T=100 tokens, k=2 -> S=200 slots, E=8, H=64, I=96; each buffer rounded up to 256 bytes.
    # padded slot capacity at the largest tile (M=256): 200 + 8*255 = 2240 -> 2304
    #   sorted slots   2304*4                 =  9216
    #   block experts  2304/16 (M>=16)*4 = 576 ->   768
    #   padded count   4                      ->   256
    #   intermediate   200*96*itemsize  bf16: 38400, fp32: 76800, fp8 (1 byte): 19200
    #   per-slot out   200*64*itemsize  bf16: 25600, fp32: 51200
    # bf16: 9216+768+256+38400+25600 = 74240; fp32: 9216+768+256+76800+51200 = 138240;
    # fp8 with bf16 activations: 9216+768+256+19200+25600 = 55040
    shape = (100, 2, 8, 64, 96)
    assert dispatch.experts_workspace_bytes(*shape, torch.bfloat16) == 74240
    assert dispatch.experts_workspace_bytes(*shape, torch.float32) == 138240
    assert dispatch.experts_workspace_bytes(*shape, torch.bfloat16, "fp8") == 55040
    assert dispatch.experts_workspace_bytes(*shape, torch.bfloat16, "int4") == 74240


def test_workspace_bound_covers_every_block_size():
    from mixbuild.plugins.align import align_capacity

    for T, k, E in [(1, 2, 8), (100, 2, 8), (7, 3, 5)]:
        bound = dispatch.experts_workspace_bytes(T, k, E, 64, 96, torch.bfloat16)
        for block_m in (16, 32, 64, 128, 256):
            capacity = align_capacity(T * k, E, block_m)
            need = capacity * 4 + capacity // block_m * 4 + 4 + T * k * (96 + 64) * 2
            assert need <= bound
