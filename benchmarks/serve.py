"""The online endpoint under load: requests/s and latency at several concurrencies, with
``@serve.batch`` on (serve.max_batch_size) and off (max_batch_size=1), side by side in one run.

    python benchmarks/serve.py [--checkpoint URI] [--arch resnet50] [--image-size 224] [--size 512]
                               [--concurrency 1,4,16,32] [--seconds 15] [--repeat 1] [key=value ...]

Without --checkpoint it serves a model with random weights (throughput does not depend on them).
Clients are threads in this process posting distinct phantom CT files (raw bodies) over HTTP to
one replica on this machine; every answer must be 200. Trailing ``section.key=value`` arguments
override the config (e.g. serve.replica_cpus=1 score.precision=fp32); by default the replica
holds every core. Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from medhier.io import storage  # noqa: E402
from medhier.synthetic import spine as synthetic  # noqa: E402
from medhier.config import load_config  # noqa: E402
from common import machine, make_checkpoint  # noqa: E402


def make_payloads(workdir: str, n: int, size: int) -> list[bytes]:
    root = os.path.join(workdir, f"serve-phantoms-{n}-{size}")
    if not os.path.exists(os.path.join(root, "labels.csv")):
        shutil.rmtree(root, ignore_errors=True)
        synthetic.generate_archive(root, n, seed=11, size=size, workers=os.cpu_count() or 1)
    return [storage.read_bytes(storage.join(root, o.path)) for page in storage.list_objects(root, exclude=["*.csv"]) for o in page]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, payloads: list[bytes], concurrency: int, seconds: float) -> dict[str, float]:
    """``concurrency`` clients posting back to back for ``seconds`` -> rate, latencies, batches."""
    stop = time.perf_counter() + seconds

    def client(k: int) -> list[tuple[float, int, dict]]:
        session, out, i = requests.Session(), [], k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            r = session.post(url + "predict", data=payloads[i % len(payloads)], headers={"Content-Type": "application/dicom"}, timeout=600)
            out.append((time.perf_counter() - t, r.status_code, r.json() if r.status_code == 200 else {}))
            i += concurrency
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = [row for part in pool.map(client, range(concurrency)) for row in part]
    elapsed = time.perf_counter() - start
    failed = [status for _, status, _ in results if status != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} requests failed (statuses {sorted(set(failed))})")
    ms = np.array([latency for latency, _, _ in results]) * 1000
    answers = [a for _, _, a in results]
    return {
        "rps": len(results) / elapsed,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "batch": statistics.mean(a["batch_size"] for a in answers),
        "decode": statistics.mean(a["timing_ms"]["decode"] for a in answers),
        "model": statistics.mean(a["timing_ms"]["model"] for a in answers),
        "replica": statistics.mean(a["timing_ms"]["total"] for a in answers),
        "n": len(results),
    }


def best(url: str, payloads: list[bytes], concurrency: int, seconds: float, repeat: int) -> dict[str, float]:
    """The best of ``repeat`` runs by requests/s: the machine is shared, noise only slows a run."""
    return max((load(url, payloads, concurrency, seconds) for _ in range(repeat)), key=lambda r: r["rps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="", help="checkpoint URI; default: random weights of --arch")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--size", type=int, default=512, help="phantom CT size (decode cost)")
    parser.add_argument("--files", type=int, default=64, help="distinct phantom files posted in turn")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--repeat", type=int, default=1, help="runs per level and variant; the best counts")
    parser.add_argument("--workdir", default="/tmp/medhier-bench")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    os.makedirs(args.workdir, exist_ok=True)
    checkpoint = args.checkpoint or make_checkpoint(args.workdir, args.arch, args.image_size)
    payloads = make_payloads(args.workdir, args.files, args.size)
    # Both variants are deployed side by side (one replica each, an idle one costs nothing) and
    # measured in turn at every level, so that both see the same load on a shared machine.
    base = ["runtime.progress=false", "runtime.local_num_cpus=" + str(4 * (os.cpu_count() or 1)), f"serve.port={_free_port()}",
            f"serve.replica_cpus={os.cpu_count() or 1}", *args.overrides]
    batched_cfg = load_config(None, [*base, "serve.route=/batched/"])
    unbatched_cfg = load_config(None, [*base, "serve.route=/unbatched/", "serve.max_batch_size=1", "serve.batch_wait_timeout_s=0"])
    from medhier.classify.task import CLASSIFY
    from medhier.infer.serve import run, shutdown

    urls = {"batched": run(batched_cfg, checkpoint, CLASSIFY, blocking=False, name="bench-batched"),
            "unbatched": run(unbatched_cfg, checkpoint, CLASSIFY, blocking=False, name="bench-unbatched")}
    results: dict[str, dict[int, dict[str, float]]] = {"batched": {}, "unbatched": {}}
    try:
        for url in urls.values():
            load(url, payloads, max(levels), min(args.seconds, 5.0))  # warm-up: first calls initialise oneDNN
        for c in levels:
            for variant, url in urls.items():
                results[variant][c] = best(url, payloads, c, args.seconds, args.repeat)
    finally:
        shutdown("bench-batched")
        shutdown("bench-unbatched", batched_cfg.serve)
    batched, unbatched = results["batched"], results["unbatched"]

    from medhier.train.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint, CLASSIFY)
    s = batched_cfg.serve
    print(f"\n{machine(gpu=bool(s.replica_gpus))} | "
          f"{loaded.cfg.model.arch} at {loaded.cfg.preprocess.image_size} px, precision {batched_cfg.score.precision} | "
          f"{args.size}x{args.size} CT phantoms | 1 replica per variant, {s.replica_cpus:g} CPU each | {time.strftime('%Y-%m-%d')}\n")
    print(f"batched: serve.max_batch_size={s.max_batch_size}, batch_wait_timeout_s={s.batch_wait_timeout_s:g}; "
          f"unbatched: max_batch_size=1. Best of {args.repeat} x {args.seconds:g} s per level; latency is the client's (HTTP round trip).\n")
    print("| concurrency | batched req/s | p50 ms | p99 ms | mean batch | unbatched req/s | p50 ms | p99 ms | batched / unbatched |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in levels:
        b, u = batched[c], unbatched[c]
        print(f"| {c} | {b['rps']:.1f} | {b['p50']:.0f} | {b['p99']:.0f} | {b['batch']:.1f} | "
              f"{u['rps']:.1f} | {u['p50']:.0f} | {u['p99']:.0f} | {b['rps'] / u['rps']:.2f}x |")
    print("\nInside the replica (means, batched): " + "; ".join(
        f"c={c}: decode {batched[c]['decode']:.0f} ms, forward pass {batched[c]['model']:.0f} ms, "
        f"request {batched[c]['replica']:.0f} ms" for c in levels))


if __name__ == "__main__":
    main()
