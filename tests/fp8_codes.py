"""fp8 activation codes compared across two implementations of one static W8A8 model.

Why logits alone cannot be compared tightly: every fp8 activation is `round_e4m3(x / s)`, and x
is a float32 result whose last bits depend on summation order, which changes with the CPU's
instruction set (AVX2 vs AVX-512), the library and the thread count. Where x / s lies within
that float32 noise of a rounding boundary, the two sides pick neighbouring codes: one element
moves by a whole e4m3 step (1/16 to 1/8 of its value) and the logits after it by ~1e-3. Such a
flip is correct behaviour on both sides, but no absolute logits tolerance both admits it and
still catches a real defect.

So the comparison is split where the arithmetic splits:

1. At every activation quantization, the codes of the two sides are compared. They must be
   equal, except where the two sides' unrounded values straddle the rounding boundary between
   two neighbouring codes (a flip): the boundary lies between x_a / s and x_b / s, widened by
   a few float32 ulps for the division (x / s or x * (1 / s)). And the unrounded values
   themselves must agree to `PREQUANT_RTOL` of the tensor's range: float32 summation-order
   differences through a few layers of this size are ~1e-6 relative; a wrong scale, weight or
   code shows at 1e-2 and above.
2. Side B (mixbuild's torch loader, whose quantization all goes through
   `formats.fake_quantize_fp8`) then continues with side A's codes, so the logits differ by
   float32 summation order only and are compared to the usual tight tolerance.

Side A is recorded from transformers + compressed-tensors (its `forward_quantize`) or from the
ONNX artifact on ONNX Runtime (every QuantizeLinear's input, scale and its DequantizeLinear's
output exposed on an in-memory copy of the graph, with the MoE function bodies inlined).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from mixbuild.plugins import formats

PREQUANT_RTOL = 1e-4     # unrounded inputs of one quantization, relative to max |x|
DIVISION_ULPS = 4        # x / s against x * (1 / s), and the rounding of the straddle test


@dataclass
class Quantization:
    """One activation quantization of side A: unrounded input, scale, dequantized output."""

    x: np.ndarray
    scale: float
    dequantized: np.ndarray


@dataclass
class Replay:
    """What side B found against side A's codes."""

    records: list[Quantization]
    compared: int = 0            # quantizations matched
    elements: int = 0            # activation elements compared
    flips: int = 0               # elements whose code differs (all straddling a boundary)
    worst_prequant: float = 0.0  # max |x_a - x_b| / max |x| over the quantizations
    problems: list[str] = field(default_factory=list)

    def check(self) -> None:
        assert not self.problems, "\n".join(self.problems[:10])
        assert self.compared > 0, "side B quantized no activation"
        assert self.flips <= max(8, self.elements // 1000), \
            f"{self.flips} code flips in {self.elements} elements"


def _codes(values: np.ndarray, scale: float) -> np.ndarray:
    """Signed index of the e4m3 code of values already on the grid (dequantized / scale)."""
    bits = formats.fp8_round(torch.from_numpy(values / np.float32(scale))).view(torch.uint8)
    bits = bits.numpy().astype(np.int32)
    return np.where(bits & 0x80, -(bits & 0x7F), bits & 0x7F)


def _grid(code_index: np.ndarray) -> np.ndarray:
    """e4m3 value of a signed code index."""
    bits = np.where(code_index < 0, 0x80 | -code_index, code_index).astype(np.uint8)
    return torch.from_numpy(bits).view(torch.float8_e4m3fn).float().numpy()


def _compare(a: Quantization, x_b: np.ndarray, out_b: np.ndarray, replay: Replay) -> None:
    x_a, s = a.x.reshape(-1).astype(np.float32), np.float32(a.scale)
    x_b, out_b = x_b.reshape(-1), out_b.reshape(-1)
    span = float(np.abs(x_b).max()) or 1.0
    diff = float(np.abs(x_a - x_b).max()) / span
    replay.worst_prequant = max(replay.worst_prequant, diff)
    replay.compared += 1
    replay.elements += x_b.size
    if diff > PREQUANT_RTOL:
        replay.problems.append(f"quantization {replay.compared}: unrounded inputs differ by "
                               f"{diff:.2e} of their range (> {PREQUANT_RTOL})")
        return
    code_a, code_b = _codes(a.dequantized.reshape(-1), s), _codes(out_b, s)
    flipped = np.nonzero(code_a != code_b)[0]
    if flipped.size == 0:
        return
    ca, cb = code_a[flipped], code_b[flipped]
    boundary = (_grid(ca) + _grid(cb)) / 2
    ua, ub = x_a[flipped] / s, x_b[flipped] / s
    slack = DIVISION_ULPS * np.spacing(np.abs(boundary).astype(np.float32))
    straddles = (np.minimum(ua, ub) - slack <= boundary) & (boundary <= np.maximum(ua, ub) + slack)
    bad = (np.abs(np.abs(ca) - np.abs(cb)) > 1) | (np.sign(ca) * np.sign(cb) < 0) | ~straddles
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        replay.problems.append(
            f"quantization {replay.compared}: element {flipped[i]} has code {ca[i]} on side A and "
            f"{cb[i]} on side B from unrounded {ua[i]!r} / {ub[i]!r} (x / scale): not two "
            f"neighbouring codes on either side of one rounding boundary")
    replay.flips += flipped.size


@contextmanager
def replaying(records: list[Quantization]):
    """Within the block, mixbuild's fake_quantize_fp8 compares its result with the side-A
    record of the same quantization (same size and scale, nearest unrounded input) and returns
    side A's values. Yields the Replay; call .check() after the block."""
    replay = Replay(records)
    original = formats.fake_quantize_fp8

    def hooked(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ours = original(x, scale)
        if x.numel() == 0:
            return ours
        s = float(scale.float().reshape(-1)[0])
        x_b = x.detach().float().reshape(-1).numpy()
        candidates = [r for r in records if r.x.size == x_b.size and
                      np.isclose(r.scale, s, rtol=1e-6, atol=0)]
        if not candidates:
            replay.problems.append(f"no side-A quantization of {x_b.size} elements at scale {s}")
            return ours
        best = min(candidates, key=lambda r: float(np.abs(r.x.reshape(-1) - x_b).max()))
        _compare(best, x_b, ours.detach().float().numpy(), replay)
        return torch.from_numpy(best.dequantized.reshape(ours.shape).astype(np.float32).copy())

    formats.fake_quantize_fp8 = hooked
    try:
        yield replay
    finally:
        formats.fake_quantize_fp8 = original


@contextmanager
def recording_compressed_tensors():
    """Records every input-activation quantization compressed-tensors applies (transformers'
    W8A8 linears) as side-A Quantizations."""
    from compressed_tensors.quantization.lifecycle import forward as ct_forward

    records: list[Quantization] = []
    original = ct_forward.forward_quantize

    def hooked(module, value, base_name, args):
        out = original(module, value, base_name, args)
        if base_name == "input" and value.numel():
            scale = float(module.input_scale.float().reshape(-1)[0])
            records.append(Quantization(value.detach().float().numpy().copy(), scale,
                                        out.detach().float().numpy().copy()))
        return out

    ct_forward.forward_quantize = hooked
    try:
        yield records
    finally:
        ct_forward.forward_quantize = original


def expose_quantizations(model) -> list[tuple[str, str, str]]:
    """Rewrite an in-memory ONNX model (OrtRunner's graph_rewrite): inline the model-local
    functions, then make every QuantizeLinear -> DequantizeLinear pair's input, scale and
    dequantized output graph outputs. Returns those names, in graph order."""
    import onnx.inliner
    from onnx import TensorProto, helper

    inlined = onnx.inliner.inline_local_functions(model)
    model.graph.CopyFrom(inlined.graph)
    del model.functions[:]
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    triples = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        dq = [n for n in consumers.get(node.output[0], []) if n.op_type == "DequantizeLinear"]
        if len(dq) == 1:
            triples.append((node.input[0], node.input[1], dq[0].output[0]))
    outputs = {o.name for o in model.graph.output}
    for name in dict.fromkeys(n for t in triples for n in t):
        if name not in outputs:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return triples


def record_onnx(artifact, feeds: dict[str, np.ndarray]) -> tuple[dict, list[Quantization]]:
    """(outputs, side-A Quantizations) of the artifact on ONNX Runtime for `feeds`."""
    from mixbuild.runtime.ort_runner import OrtRunner

    found: list[list[tuple[str, str, str]]] = []
    runner = OrtRunner(artifact, graph_rewrite=lambda m: found.append(expose_quantizations(m)))
    out = runner.infer(feeds)
    records = [Quantization(out[x], float(np.asarray(out[s]).reshape(-1)[0]), out[dq])
               for x, s, dq in found[0] if out[x].size]
    return out, records


def run_replayed(run: Callable[[], np.ndarray], records: list[Quantization]) -> np.ndarray:
    """Logits of side B's `run()` with side A's codes, after checking them (see the module doc)."""
    with replaying(records) as replay:
        logits = run()
    replay.check()
    return logits
