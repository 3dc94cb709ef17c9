"""Serving load test on 127.0.0.1: the composed Ray Serve app vs the same pipeline in one process, in one run.

    python benchmarks/serve_load.py [--artifacts artifacts] [--requests 200] [--concurrency 8] [--burst 200]

Both servers answer the same ``POST /v1/answer`` (multipart upload of a synthetic test image and its closed
question) from the same artifacts (run ``python jobs/pipeline.py`` first):

* **one process**: a plain FastAPI/uvicorn server (no Ray) in a subprocess that parses the request the same way
  and runs :class:`~medrag_ray.serving.answer.LocalAnswerer` -- route, retrieve and read -- one request at a time;
* **composed**: ``serve/app.py`` (Router -> Retriever per domain -> Reader deployments with request batching).

A fixed number of requests is sent by a fixed number of client threads; printed per server: p50/p95/p99 latency,
requests/s, error count, and the ratios composed / one process. Then an overload phase: the composed app is
redeployed with a one-request ingress queue and hit with a burst; queued requests beyond the bound must be shed
with 503 (no other 5xx) and ``/healthz`` must still answer 200 afterwards.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests
from fastapi import FastAPI, Request  # module level: FastAPI resolves the endpoint's annotations from here
from fastapi.responses import JSONResponse

from medrag_ray.config import DeploymentSettings, ServeConfig
from medrag_ray.data.schema import Sample, read_parquet
from medrag_ray.utils import setup_logging

logger = logging.getLogger("benchmarks.serve_load")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 300.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s} s")


def load(url: str, payloads: list[tuple[bytes, str]], concurrency: int) -> dict[str, Any]:
    """Send every payload once with ``concurrency`` client threads; latency percentiles, rate, status counts."""
    latencies: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()

    def one(item: tuple[bytes, str]) -> None:
        t0 = time.perf_counter()
        try:
            code = requests.post(url + "/v1/answer", files={"image": ("x.png", item[0], "image/png")},
                                 data={"question": item[1]}, timeout=300).status_code
        except requests.RequestException:
            code = -1
        dt = time.perf_counter() - t0
        with lock:
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                latencies.append(dt)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, payloads))
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1e3 if latencies else np.zeros(1)
    return {"n": len(payloads), "ok": codes.get(200, 0), "errors": len(payloads) - codes.get(200, 0),
            "codes": dict(sorted(codes.items())), "rps": codes.get(200, 0) / wall, "wall_s": wall,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99))}


def local_server_main(artifacts: str, port: int) -> None:
    """The one-process baseline: FastAPI + uvicorn + LocalAnswerer, requests answered one at a time."""
    import uvicorn

    from medrag_ray.serving.answer import LocalAnswerer
    from medrag_ray.serving.images import InputError
    from serve.request_body import parse_body, read_capped

    cfg = ServeConfig(artifacts_dir=artifacts)
    answerer = LocalAnswerer(cfg)
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/answer")
    async def answer(request: Request) -> JSONResponse:
        try:
            body = await read_capped(request.headers, request.stream(), cfg.limits.max_body_bytes)
            parsed = await parse_body(request.headers.get("content-type"), body, cfg.limits)
        except InputError as exc:
            return JSONResponse(status_code=exc.status, content={"detail": exc.to_dict()})
        with lock:
            [out] = answerer.answer([(parsed.image, parsed.fields)])
        if isinstance(out, InputError):
            return JSONResponse(status_code=out.status, content={"detail": out.to_dict()})
        return JSONResponse(out)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--burst", type=int, default=200, help="requests of the overload phase (64 threads)")
    parser.add_argument("--local-server", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local_server:
        local_server_main(args.artifacts, args.local_server)
        return
    setup_logging()
    from ray import serve

    from jobs.runtime import shutdown_ray
    from serve.app import start

    samples_path = Path(args.artifacts) / "data" / "synthetic" / "samples_test.parquet"
    if not samples_path.is_file():
        raise SystemExit(f"{samples_path} is missing: run `python jobs/pipeline.py` (or pass --artifacts)")
    closed = [s for s in read_parquet(samples_path, Sample) if s.answer_type == "closed"]
    payloads = [(closed[i % len(closed)].image_bytes, closed[i % len(closed)].question) for i in range(args.requests)]

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, __file__, "--artifacts", args.artifacts, "--local-server", str(port)],
                            env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        load(url, payloads[: min(8, len(payloads))], 2)  # warm-up
        local = load(url, payloads, args.concurrency)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    cfg = ServeConfig(artifacts_dir=args.artifacts, port=free_port())
    try:
        start(cfg)
        url = f"http://127.0.0.1:{cfg.port}"
        wait_healthy(url)
        load(url, payloads[: min(8, len(payloads))], 2)
        composed = load(url, payloads, args.concurrency)
        serve.delete("medrag")
        tight = ServeConfig(artifacts_dir=args.artifacts, port=cfg.port, ingress=DeploymentSettings(
            num_cpus=0.1, max_batch_size=1, max_ongoing_requests=2, max_queued_requests=1))
        start(tight)
        wait_healthy(url)
        burst = [payloads[i % len(payloads)] for i in range(args.burst)]
        overload = load(url, burst, 64)
        health_after = requests.get(url + "/healthz", timeout=30).status_code
    finally:
        serve.shutdown()
        shutdown_ray()

    print(f"\nserve_load: {args.requests} closed questions, {args.concurrency} client threads, 127.0.0.1")
    print(f"{'server':<14}{'ok':>6}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    for name, r in (("one process", local), ("composed", composed)):
        print(f"{name:<14}{r['ok']:>6}{r['errors']:>8}{r['rps']:>9.2f}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}"
              f"{r['p99_ms']:>9.1f}")
    if not local["ok"] or not composed["ok"]:
        raise SystemExit(f"a server answered no request: one process {local['codes']}, composed {composed['codes']}")
    print(f"ratio composed / one process: throughput {composed['rps'] / local['rps']:.2f}x, "
          f"p50 {composed['p50_ms'] / local['p50_ms']:.2f}x, p99 {composed['p99_ms'] / local['p99_ms']:.2f}x")
    other_5xx = sum(n for code, n in overload["codes"].items() if code >= 500 and code != 503)
    print(f"overload: burst of {args.burst} with 64 threads against a 2-slot, 1-queued ingress: "
          f"status counts {overload['codes']}, other 5xx {other_5xx}, /healthz after: {health_after}")


if __name__ == "__main__":
    main()
