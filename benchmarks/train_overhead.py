"""Ray Train DDP against plain PyTorch DDP: steady-state step time, side by side in one run.

    python benchmarks/train_overhead.py [--arch resnet18] [--image-size 64] [--batch 16] [--steps 40]

Both sides run the same hierarchical model, batch size and synthetic tensors, with 2 gloo
workers of 1 thread each on the CPU (or one GPU each with --gpu), and time the same training
step (forward, hierarchical loss, backward with DDP all-reduce, AdamW step) after warm-up. Ray
Train's cost is in starting workers and in reporting, not in the step; the table shows whether
any of it leaks into the steady state. Prints a Markdown table for benchmarks/RESULTS.md.
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
    from medhier.model import HierarchicalLoss, build_model
    from medhier.taxonomy import Taxonomy

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
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=world + 1, logging_level="ERROR")
    use_gpu = settings["device"].startswith("cuda")
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config=settings,
        scaling_config=ray.train.ScalingConfig(num_workers=world, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"overhead-{int(time.time())}", storage_path="/tmp/medhier-bench-ray"),
    )
    result = trainer.fit()
    ray.shutdown()
    return result.return_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="alternate plain/Ray this many times")
    args = parser.parse_args()
    settings = {"arch": args.arch, "image_size": args.image_size, "batch": args.batch, "steps": args.steps,
                "warmup": args.warmup, "device": "cuda" if args.gpu else "cpu"}
    plain, ray_times = [], []
    for _ in range(args.rounds):  # alternate, so that drifting machine load hits both sides
        plain += plain_ddp(settings, args.workers)
        ray_times += ray_ddp(settings, args.workers)
    p, r = statistics.median(plain), statistics.median(ray_times)
    print(f"\n{machine()} | {args.workers} workers x 1 thread | {args.arch} "
          f"{args.image_size}px batch {args.batch}/worker bf16 channels_last | {time.strftime('%Y-%m-%d')}\n")
    print("| DDP | median step (ms) | p90 step (ms) | images/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, t in (("plain PyTorch (torch.multiprocessing, gloo)", plain), ("Ray Train TorchTrainer", ray_times)):
        q = statistics.quantiles(t, n=10)[-1]
        print(f"| {name} | {statistics.median(t) * 1e3:.1f} | {q * 1e3:.1f} | {args.workers * args.batch / statistics.median(t):.1f} |")
    print(f"\nRay Train overhead on the steady-state step: {(r / p - 1):+.1%} (target <= 3 %)")


if __name__ == "__main__":
    main()
