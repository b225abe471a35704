"""Ray Train DDP against plain PyTorch DDP: steady-state step time, side by side in one run.

    python benchmarks/train_overhead.py [--arch resnet18] [--image-size 64] [--batch 16] [--steps 80] [--rounds 4]

Both sides run the same hierarchical model, batch size and synthetic tensors, with 2 gloo
workers of 1 thread each on the CPU (or one GPU each with --gpu), and time the same training
step (forward, hierarchical loss, backward with DDP all-reduce, AdamW step) after warm-up.

How the sides are compared, as Ray's own benchmark behind its "within 2.5 %" does
(release/air_tests/air_benchmarks/workloads/torch_benchmark.py: Ray Train and vanilla PyTorch
DDP run one after the other on the same running cluster): one Ray instance is started and left
to settle, then plain DDP (torch.multiprocessing, outside Ray) and Ray Train's TorchTrainer
alternate --rounds times on it, and the figure is the median of the rounds' ratios. So the
cluster's idle daemons are on both sides, and the ratio is what Ray Train adds to the step.
What an idle Ray instance itself costs is measured apart: plain DDP with no Ray running, before
Ray starts and after it stops, against the plain rounds with Ray up. Prints a Markdown table for
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import machine  # noqa: E402


def step_times(settings: dict) -> list[float]:
    """Run `steps` DDP training steps in an initialised process group -> seconds per step."""
    import torch.distributed as dist

    from medhier.config import ModelConfig, TaxonomyConfig
    from medhier.classify.model import HierarchicalLoss, build_model
    from medhier.classify.taxonomy import Taxonomy

    torch.set_num_threads(1)
    device = torch.device(settings["device"])
    torch.manual_seed(0)
    tax = Taxonomy.from_config(TaxonomyConfig())
    model = build_model(ModelConfig(arch=settings["arch"], pretrained="none", finetune_depth=4), tax).to(device, memory_format=torch.channels_last)
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = HierarchicalLoss(tax).to(device)
    b, s = settings["batch"], settings["image_size"]
    x = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)
    leaf = torch.randint(0, tax.num_leaves, (b,), device=device)
    main = torch.as_tensor(tax.leaf_main, device=device)[leaf]
    dtype = torch.bfloat16
    times = []
    for i in range(settings["warmup"] + settings["steps"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            out = model(x)
        loss = loss_fn(out, main, leaf)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= settings["warmup"]:
            times.append(time.perf_counter() - t)
    return times


def _plain_worker(rank: int, world: int, port: int, settings: dict, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if settings["device"].startswith("cuda") else "gloo"
    if backend == "nccl":
        settings = {**settings, "device": f"cuda:{rank}"}
    dist.init_process_group(backend, rank=rank, world_size=world)
    times = step_times(settings)
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def plain_ddp(settings: dict, world: int) -> list[float]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_plain_worker, args=(r, world, port, settings, queue)) for r in range(world)]
    for p in procs:
        p.start()
    times = queue.get()
    for p in procs:
        p.join()
    return times


def _ray_loop(config: dict) -> list[float]:
    import ray.train.torch

    settings = dict(config)
    if settings["device"].startswith("cuda"):
        settings["device"] = str(ray.train.torch.get_device())
    return step_times(settings)  # rank 0's return value reaches the driver


def ray_ddp(settings: dict, world: int) -> list[float]:
    """Ray Train on the Ray instance already running (see main)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = settings["device"].startswith("cuda")
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config=settings,
        scaling_config=ray.train.ScalingConfig(num_workers=world, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"overhead-{int(time.time())}", storage_path="/tmp/medhier-bench-ray"),
    )
    return trainer.fit().return_value


def _row(name: str, times: list[float], workers: int, batch: int) -> str:
    q = statistics.quantiles(times, n=10)[-1]
    return f"| {name} | {statistics.median(times) * 1e3:.1f} | {q * 1e3:.1f} | {workers * batch / statistics.median(times):.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--rounds", type=int, default=4, help="alternate plain/Ray this many times on one Ray instance")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to leave a new Ray instance before measuring")
    args = parser.parse_args()
    import ray

    settings = {"arch": args.arch, "image_size": args.image_size, "batch": args.batch, "steps": args.steps,
                "warmup": args.warmup, "device": "cuda" if args.gpu else "cpu"}
    no_ray = plain_ddp(settings, args.workers)
    ray.init(num_cpus=args.workers + 1, logging_level="ERROR")
    time.sleep(args.settle)  # the dashboard, agents and prestarted workers start up
    plain, ray_times, ratios = [], [], []
    for _ in range(args.rounds):  # alternate, so that drifting machine load hits both sides
        p = plain_ddp(settings, args.workers)
        r = ray_ddp(settings, args.workers)
        plain += p
        ray_times += r
        ratios.append(statistics.median(r) / statistics.median(p) - 1)
    ray.shutdown()
    no_ray += plain_ddp(settings, args.workers)
    overhead = statistics.median(ratios)
    print(f"\n{machine()} | {args.workers} workers x 1 thread | {args.arch} "
          f"{args.image_size}px batch {args.batch}/worker bf16 channels_last | {args.rounds} rounds of {args.steps} steps | "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| DDP | median step (ms) | p90 step (ms) | images/s |")
    print("| --- | ---: | ---: | ---: |")
    print(_row("plain PyTorch (torch.multiprocessing, gloo), Ray instance up", plain, args.workers, args.batch))
    print(_row("Ray Train TorchTrainer, same Ray instance", ray_times, args.workers, args.batch))
    print(_row("plain PyTorch, no Ray running (before Ray starts and after it stops)", no_ray, args.workers, args.batch))
    print(f"\nRay Train overhead on the steady-state step: {overhead:+.1%}, median of the rounds "
          f"({', '.join(f'{x:+.1%}' for x in ratios)}; target <= 3 %)")
    print(f"an idle Ray instance's cost to plain DDP: {statistics.median(plain) / statistics.median(no_ray) - 1:+.1%}; "
          f"Ray Train against plain DDP with no Ray running: {statistics.median(ray_times) / statistics.median(no_ray) - 1:+.1%}")


if __name__ == "__main__":
    main()
