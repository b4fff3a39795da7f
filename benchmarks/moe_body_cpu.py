"""The MoE layer on ONNX Runtime CPU: mixbuild's MoEGate + MoEExperts function bodies vs ONNX
Runtime's own fused `com.microsoft.MoE` kernel, same weights, in one run.

    python benchmarks/moe_body_cpu.py --threads 2

For each shape (the trained fixture's MoE and the 338M random model's MoE of
benchmarks/generation.py) and token count T it times one MoE layer (router logits in, mixed
output out) as a session with only that layer, fp32, random weights and routing, the weights
constant initializers (so both sides may prepack them). Median of --repeats runs after warm-up.
The last column is the largest difference between the two outputs: both compute softmax ->
top-k -> renormalise -> SwiGLU experts -> weighted sum, so it should be rounding only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"fixture (H128 I256 E8 k2)": (128, 256, 8, 2),
          "338M (H1024 I3584 E8 k2)": (1024, 3584, 8, 2)}


def sessions(h: int, i: int, e: int, k: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mixbuild.contract import DOMAIN
    from mixbuild.exporter.functions import experts_function, gate_function

    rng = np.random.default_rng(0)
    gate_up = (rng.standard_normal((e, 2 * i, h)) * 0.03).astype(np.float32)
    down = (rng.standard_normal((e, h, i)) * 0.03).astype(np.float32)
    # ONNX Runtime's CPU MoE takes SwiGLU weights interleaved: gate row j, then up row j
    interleaved = np.stack([gate_up[:, :i], gate_up[:, i:]], axis=2).reshape(e, 2 * i, h)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", h]),
              helper.make_tensor_value_info("router", TensorProto.FLOAT, ["T", e])]
    output = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", h])]
    ours = helper.make_graph(
        [helper.make_node("MoEGate", ["router"], ["w", "ids"], domain=DOMAIN, top_k=k, normalize=1),
         helper.make_node("MoEExperts", ["x", "w", "ids", "gate_up", "down"], ["y"], domain=DOMAIN)],
        "mixbuild", inputs, output,
        [numpy_helper.from_array(gate_up, "gate_up"), numpy_helper.from_array(down, "down")])
    theirs = helper.make_graph(
        [helper.make_node("MoE", ["x", "router", "fc1", "", "fc2"], ["y"], domain="com.microsoft",
                          k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                          activation_beta=0.0, swiglu_limit=1e30, normalize_routing_weights=1)],
        "ort", inputs, output,
        [numpy_helper.from_array(interleaved, "fc1"), numpy_helper.from_array(down, "fc2")])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1),
              helper.make_opsetid("com.microsoft", 1)]
    models = [helper.make_model(ours, opset_imports=opsets,
                                functions=[gate_function(), experts_function(e)]),
              helper.make_model(theirs, opset_imports=opsets)]
    return [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
            for m in models]


def timed(session, feeds, repeats: int) -> tuple[float, np.ndarray]:
    out = session.run(None, feeds)[0]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512])
    args = parser.parse_args()
    rows = []
    for name, (h, i, e, k) in SHAPES.items():
        ours, theirs = sessions(h, i, e, k, args.threads)
        rng = np.random.default_rng(1)
        for t in args.tokens:
            feeds = {"x": rng.standard_normal((t, h)).astype(np.float32),
                     "router": rng.standard_normal((t, e)).astype(np.float32)}
            mine, a = timed(ours, feeds, args.repeats)
            fused, b = timed(theirs, feeds, args.repeats)
            rows.append((name, t, mine, fused, float(np.abs(a - b).max())))
        print(f"  {name}: measured", flush=True)
    print(f"\nONNX Runtime CPU, fp32, threads={args.threads}, median of {args.repeats} runs\n")
    print("| MoE shape | tokens | mixbuild bodies ms | com.microsoft.MoE ms | speed vs MoE | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name, t, mine, fused, diff in rows:
        print(f"| {name} | {t} | {mine * 1e3:.3f} | {fused * 1e3:.3f} | {fused / mine:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
