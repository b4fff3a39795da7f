"""What a serving loop counts, and its Prometheus text form (exposition format 0.0.4).

The scheduler updates one `ServingMetrics` from its loop thread; readers (an HTTP /metrics
handler, a service's own exporter) take `snapshot()` or `prometheus()` from any thread. No
client library: the format is a few lines of text, and mixbuild's base install stays small.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

# Latency buckets in seconds: decode steps of a small model on a CPU take ~1 ms, a prefill of a
# long prompt on a large one seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)


@dataclass
class Histogram:
    """Cumulative-bucket histogram, as Prometheus reads it."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)   # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {self.total!r}", f"{name}_count {self.count}"]
        return out


class ServingMetrics:
    """Gauges, counters and latency histograms of one scheduler."""

    def __init__(self, slots_total: int) -> None:
        self.lock = threading.Lock()
        self.slots_total = slots_total
        self.queue_depth = 0
        self.running = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.finished: dict[str, int] = {}
        self.refused = 0
        self.ttft = Histogram()
        self.itl = Histogram()
        self.step_time = Histogram()

    def snapshot(self) -> dict:
        with self.lock:
            return {"queue_depth": self.queue_depth, "running": self.running,
                    "slots_used": self.running, "slots_total": self.slots_total,
                    "prompt_tokens": self.prompt_tokens,
                    "generation_tokens": self.generation_tokens, "steps": self.steps,
                    "finished": dict(self.finished), "refused": self.refused,
                    "ttft_count": self.ttft.count, "itl_count": self.itl.count}

    def prometheus(self, prefix: str = "mixbuild") -> str:
        """The metrics in Prometheus' text exposition format."""
        with self.lock:
            lines: list[str] = []

            def metric(name, kind, text, values):
                full = f"{prefix}_{name}"
                lines.extend([f"# HELP {full} {text}", f"# TYPE {full} {kind}"])
                lines.extend(values(full))

            def single(value):
                return lambda full: [f"{full} {value}"]

            metric("queue_depth", "gauge", "Requests waiting for a KV slot.", single(self.queue_depth))
            metric("requests_running", "gauge", "Requests holding a KV slot.", single(self.running))
            metric("kv_slots_used", "gauge", "KV-cache slots in use.", single(self.running))
            metric("kv_slots_total", "gauge", "KV-cache slots (max_batch).", single(self.slots_total))
            metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.",
                   single(self.prompt_tokens))
            metric("generation_tokens_total", "counter", "Tokens generated.",
                   single(self.generation_tokens))
            metric("steps_total", "counter", "Model steps run.", single(self.steps))
            metric("requests_refused_total", "counter", "Requests refused: the queue was full.",
                   single(self.refused))
            metric("requests_finished_total", "counter", "Requests ended, by finish reason.",
                   lambda full: [f'{full}{{finish_reason="{k}"}} {v}'
                                 for k, v in sorted(self.finished.items())] or [f"{full} 0"])
            metric("time_to_first_token_seconds", "histogram",
                   "From submission to the first generated token.", self.ttft.lines)
            metric("inter_token_latency_seconds", "histogram",
                   "Between consecutive tokens of one request.", self.itl.lines)
            metric("step_seconds", "histogram", "One model step of the running batch.",
                   self.step_time.lines)
            return "\n".join(lines) + "\n"
