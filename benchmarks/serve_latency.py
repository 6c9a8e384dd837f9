"""Latency and throughput of ``cli.py serve`` with a frozen-encoder text model, measured from a client
on the same machine (the clients share its cores with the server, so the figures are a floor).

    python benchmarks/serve_latency.py --model models/clinc150 [--requests 10000] [--clients 16]

Prints: p50/p99 latency of one-text requests sent one at a time; texts/s for batches of 64 from 4
clients; and p50/p99, requests/s and the number of failures over ``--requests`` one-text requests
from ``--clients`` concurrent clients. The server runs as its own process (``cli.py serve``), as a
user runs it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mtl.device import cpu_name

ROOT = Path(__file__).parents[1]



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def predict(self, texts: list[str]) -> tuple[int, float]:
        body = json.dumps({"texts": texts})
        t0 = time.perf_counter()
        try:
            self.conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
            r = self.conn.getresponse()
            r.read()
            status = r.status
        except (OSError, http.client.HTTPException):
            self.conn.close()
            status = 0
        return status, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="An adapted text model (cli.py adapt --out).")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=16)
    a = p.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "--model", str(a.model), "--port",
                               str(port), "--device", "cpu"], stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        deadline = time.time() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("the server did not come up")
            time.sleep(0.2)
        texts = [f"how do i {w} my {o} today" for w in ("reset", "check", "change", "cancel", "book")
                 for o in ("pin", "balance", "flight", "alarm", "order", "reservation")]
        one = Client(port)
        for t in texts[:20]:  # warm-up
            one.predict([t])
        single = [one.predict([texts[i % len(texts)]])[1] for i in range(300)]

        batch = [texts[i % len(texts)] for i in range(64)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            def batches(_: int) -> int:
                c = Client(port)
                return sum(c.predict(batch)[0] == 200 for _ in range(10))
            ok_batches = sum(pool.map(batches, range(4)))
        texts_per_s = ok_batches * 64 / (time.perf_counter() - t0)

        per_client = a.requests // a.clients
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            def load(k: int) -> list[tuple[int, float]]:
                c = Client(port)
                return [c.predict([texts[(k + i) % len(texts)]]) for i in range(per_client)]
            results = [r for rs in pool.map(load, range(a.clients)) for r in rs]
        wall = time.perf_counter() - t0
        lat = np.asarray([s for _, s in results])
        failed = sum(code != 200 for code, _ in results)
        report = {
            "cpu": cpu_name(), "cores": os.cpu_count(),
            "single_text_p50_ms": round(1000 * float(np.percentile(single, 50)), 2),
            "single_text_p99_ms": round(1000 * float(np.percentile(single, 99)), 2),
            "batch64_texts_per_s": round(texts_per_s, 1),
            "load_requests": len(results), "load_clients": a.clients, "load_failed": failed,
            "load_requests_per_s": round(len(results) / wall, 1),
            "load_p50_ms": round(1000 * float(np.percentile(lat, 50)), 2),
            "load_p99_ms": round(1000 * float(np.percentile(lat, 99)), 2),
        }
        print(json.dumps(report, indent=1))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
