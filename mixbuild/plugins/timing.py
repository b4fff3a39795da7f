"""GPU timing shared by benchmarks/moe_kernels.py and scripts/tune_moe.py (CUDA only)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def cuda_median_ms(fn: Callable[[], object], reps: int = 20, inner: int = 5,
                   graph: bool = True) -> float:
    """Median milliseconds of one fn() call, over `reps` samples of `inner` back-to-back calls.

    With `graph`, fn is captured once in a CUDA graph and the samples replay it (no Python or
    launch overhead); fn must then not synchronise with the host.
    """
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        cuda_graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            with torch.cuda.graph(cuda_graph, stream=stream):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        run = cuda_graph.replay
    samples = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)
