"""One oversized request against a running stream: does `mixbuild serve` stall anyone?

    python benchmarks/serve_big_prompt.py [--artifact DIR] [--megabytes 15]

Starts `mixbuild serve` on the fixture's serving artifact (exported here when --artifact is
not given), starts one streaming completion, then sends a completion whose prompt is
--megabytes MB of text (under the 16 MiB body limit), while a probe polls /health every 20 ms.
Prints a table: the big request's status and time, the slowest /health answer while it was
in flight, the longest gap between the stream's chunks after it was sent, and the
server's resident memory before and after (Linux /proc). No peers: this is a fault test of
mixbuild's own server.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path)
    parser.add_argument("--megabytes", type=float, default=15.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="big-prompt-"))
    artifact = args.artifact
    if artifact is None:
        from mixbuild.demo import FIXTURE
        from mixbuild.exporter.export import export_checkpoint

        artifact = export_checkpoint(FIXTURE, work / "artifact", progress=False)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mixbuild", "serve", str(artifact), "--port",
                               str(port), "--max-context", "1024"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        before = rss_mb(server.pid)
        gaps: list[tuple[float, float]] = []     # (arrival, gap since the previous chunk)
        done = threading.Event()

        def stream() -> None:
            body = {"prompt": "def f(x):", "max_tokens": 1000, "stream": True, "ignore_eos": True}
            last = time.perf_counter()
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for _ in r.iter_lines():
                    now = time.perf_counter()
                    gaps.append((now, now - last))
                    last = now
            done.set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        time.sleep(0.2)
        health: list[float] = []
        result: dict = {}

        def big() -> None:
            body = json.dumps({"prompt": "x" * int(args.megabytes * 1e6), "max_tokens": 4})
            start = time.perf_counter()
            r = httpx.post(f"{url}/v1/completions", content=body,
                           headers={"Content-Type": "application/json"}, timeout=300)
            result.update(status=r.status_code, seconds=time.perf_counter() - start,
                          code=r.json().get("error", {}).get("code"))

        sender = threading.Thread(target=big)
        sent = time.perf_counter()
        sender.start()
        while sender.is_alive():
            start = time.perf_counter()
            httpx.get(f"{url}/health", timeout=120)
            health.append(time.perf_counter() - start)
            time.sleep(0.02)
        streamer.join()
        stalled = [gap for at, gap in gaps if at > sent]   # chunks after the big request left
        time.sleep(1.0)
        after = rss_mb(server.pid)
        rows = [("big request", f"HTTP {result['status']} {result['code']} in "
                                f"{result['seconds']:.2f} s"),
                ("slowest /health while it ran", f"{max(health) * 1000:.0f} ms ({len(health)} probes)"),
                ("longest stream gap after it was sent", f"{max(stalled, default=0) * 1000:.0f} ms"),
                ("server RSS before / after", f"{before:.0f} MB / {after:.0f} MB")]
        print(f"| {args.megabytes:g} MB prompt | measured |\n|---|---|")
        for name, value in rows:
            print(f"| {name} | {value} |")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
