"""The Ray tax: the sampling phase as plain PyTorch DDP beside the Ray Train run (results:
bench/RESULTS.md, "Ray tax").

    python bench/ray_tax.py                          # the default job, writes bench/ray_tax.json
    python bench/ray_tax.py --num-samples 200000     # the 16x-data job (bench/claims_large)
    python bench/ray_tax.py --smoke-test             # tiny, seconds, no JSON

The same run twice in one process invocation: the default job's sampling phase (MNIST-1D MLP,
2 workers x 1 CPU, 20 of the 40 epochs' schedule, a candidate snapshot every epoch, val/test
evaluated every epoch), with the product's data (:func:`twa_ray.data.load_data`), model
(:func:`twa_ray.models.build_model`, seeded as the workers seed it), learning-rate schedule
and snapshot writer (:func:`twa_ray.snapshot`):

- ``plain_ddp``: ``torch.multiprocessing.spawn`` of 2 processes, a gloo process group, DDP, one
  thread each (as Ray gives a 1-CPU worker); no checkpoints, no retries;
- ``ray_train``: :func:`twa_ray.ray.sampling.run_sampling` on a local Ray started here (the
  start is counted), with its checkpoints and fault tolerance.

Per system: ``wall_s`` (what the user waits: process or Ray start, imports, process group, data,
epochs, teardown), ``epoch_s`` (rank 0's seconds inside the epochs: train, snapshots,
evaluation), ``fixed_s = wall_s - epoch_s`` and the final test accuracy. The ratio Ray/DDP of
``wall_s`` is the price of Ray's scheduling and fault tolerance on this machine. The dataset is
generated (cached) before either is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import cpu_model, free_port, markdown_table, write_json

from twa_ray.config import DataConfig, RunConfig, SamplingConfig

HERE = Path(__file__).resolve().parent
__all__ = ["job", "plain_ddp", "ray_train"]


def job(args: argparse.Namespace) -> tuple[DataConfig, SamplingConfig]:
    """The default job's data and sampling configs; ``args`` may set ``num_samples``, ``seed``,
    ``epochs`` and ``workers`` (missing or None: the defaults)."""
    cfg = RunConfig()
    data = dataclasses.replace(
        cfg.data,
        num_samples=getattr(args, "num_samples", None),
        seed=getattr(args, "seed", None) or cfg.data.seed,
    )
    s = cfg.sampling
    sampling = dataclasses.replace(
        s,
        epochs=getattr(args, "epochs", None) or s.epochs,
        num_workers=getattr(args, "workers", None) or s.num_workers,
    )
    return data, sampling


# --------------------------------------------------------------------------- plain DDP


def plain_ddp(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling phase as plain PyTorch DDP (gloo, no Ray): ``{"wall_s", "epoch_s",
    "fixed_s", "test_acc", "val_acc", "candidates"}`` (``args``: see :func:`job`)."""
    import torch.multiprocessing as mp

    data, sampling = job(args)
    store = tempfile.mkdtemp(prefix="twa-ddp-")
    out = os.path.join(store, "rank0.pt")
    try:
        t0 = time.perf_counter()
        mp.spawn(
            _ddp_worker,
            args=(sampling.num_workers, data, sampling, store, out, free_port()),
            nprocs=sampling.num_workers,
            join=True,
        )
        wall = time.perf_counter() - t0
        res = torch.load(out, weights_only=True)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    return {"wall_s": wall, **res, "fixed_s": wall - res["epoch_s"]}


def _ddp_worker(
    rank: int,
    world: int,
    data: DataConfig,
    sampling: SamplingConfig,
    store: str,
    out: str,
    port: int,
) -> None:
    """One DDP process: the Ray Train sampling loop's steps without Ray (no checkpoints)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from twa_ray.core.bn import all_reduce_
    from twa_ray.core.evaluate import EVAL_BATCH, evaluate_sharded
    from twa_ray.data import load_data
    from twa_ray.models import build_model
    from twa_ray.ray.sampling import _lr_schedule  # the product's schedule, not a copy
    from twa_ray.ray.worker import strided
    from twa_ray.store.snapshots import snapshot

    torch.set_num_threads(int(sampling.cpus_per_worker))  # what Ray gives a 1-CPU worker
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    d = data
    splits = load_data(d)
    torch.manual_seed(d.seed)
    inner = build_model(d.model, num_classes=splits.num_classes, input_shape=splits.input_shape)
    model = DistributedDataParallel(inner)
    s = sampling
    opt = torch.optim.SGD(
        model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
    )
    sampler: DistributedSampler[Any] = DistributedSampler(
        splits.train, num_replicas=world, rank=rank, shuffle=True, seed=d.seed
    )
    loader = DataLoader(
        splits.train, batch_size=s.batch_size // world, sampler=sampler, drop_last=True
    )
    val, test = (
        DataLoader(strided(ds, rank, world), batch_size=EVAL_BATCH)
        for ds in (splits.val, splits.test)
    )
    lr_at, step, epoch_s = _lr_schedule(s, len(loader)), 0, 0.0
    for epoch in range(s.sample_epochs):
        t = time.perf_counter()
        model.train()
        sampler.set_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for x, y in loader:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.detach()
        snapshot(
            model, store, step=step, epoch=epoch + 1, run_id="ddp", source="sampling", seed=d.seed
        )
        all_reduce_(loss_sum)
        v, te = evaluate_sharded(inner, val), evaluate_sharded(inner, test)
        epoch_s += time.perf_counter() - t
    if rank == 0:
        torch.save(
            {
                "epoch_s": epoch_s,
                "test_acc": te.acc,
                "val_acc": v.acc,
                "candidates": s.sample_epochs,
            },
            out,
        )
    dist.destroy_process_group()


# --------------------------------------------------------------------------- Ray Train


def ray_train(args: argparse.Namespace) -> dict[str, Any]:
    """The same sampling phase with :func:`twa_ray.ray.sampling.run_sampling` on a local Ray
    started here (its start counted in ``wall_s``, also given as ``ray_start_s``)."""
    import ray

    from twa_ray.connect import connect_ray
    from twa_ray.ray.sampling import run_sampling

    data, sampling = job(args)
    work = tempfile.mkdtemp(prefix="twa-ray-tax-")
    try:
        t0 = time.perf_counter()
        connect_ray(dashboard=False)
        t1 = time.perf_counter()
        res = run_sampling(
            data,
            sampling,
            store_uri=os.path.join(work, "candidates"),
            run_dir=work,
            run_id="tax",
            progress=False,
        )
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "wall_s": wall,
        "ray_start_s": t1 - t0,
        "epoch_s": res.epoch_time_s,
        "fixed_s": wall - res.epoch_time_s,
        "test_acc": res.final_metrics["test_acc"],
        "val_acc": res.final_metrics["val_acc"],
        "candidates": len(res.candidates),
    }


# --------------------------------------------------------------------------- table


def table(result: dict[str, Any]) -> list[str]:
    """The Markdown lines of one result: a row per system, then the ratio."""
    rows = []
    for name in ("plain_ddp", "ray_train"):
        r = result[name]
        rows.append(
            [
                name,
                f"{r['wall_s']:.1f}",
                f"{r['epoch_s']:.1f}",
                f"{r['epoch_s'] / result['sample_epochs']:.2f}",
                f"{r['fixed_s']:.1f}",
                f"{r['test_acc']:.4f}",
            ]
        )
    ratio = result["ratio_wall"]
    head = (
        f"Sampling phase, MNIST-1D MLP, {result['num_samples']} samples, {result['workers']} "
        f"workers, {result['sample_epochs']} of {result['epochs']} epochs; CPU {result['cpu']}, "
        f"{result['cores']} cores, load average {result['load_avg_1min'][0]:.1f} -> "
        f"{result['load_avg_1min'][1]:.1f}"
    )
    header = ["system", "wall s", "epochs s", "s / epoch", "fixed s", "test acc"]
    return [head, "", *markdown_table(header, rows), "", f"Ray/DDP wall-clock: **{ratio:.2f}x**"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num-samples", type=int, default=None, help="MNIST-1D size (default 12,500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/ray_tax.json)")
    p.add_argument("--smoke-test", action="store_true", help="tiny run, no JSON")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.num_samples, args.epochs = 1500, 4
    data, sampling = job(args)
    from twa_ray.data import load_data

    load_data(data)  # generated and cached, not timed
    load_before = os.getloadavg()[0]
    ddp = plain_ddp(args)
    ray_res = ray_train(args)
    result = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "num_samples": data.num_samples or 12_500,
        "workers": sampling.num_workers,
        "epochs": sampling.epochs,
        "sample_epochs": sampling.sample_epochs,
        "plain_ddp": ddp,
        "ray_train": ray_res,
        "ratio_wall": ray_res["wall_s"] / ddp["wall_s"],
        "ratio_epochs": ray_res["epoch_s"] / ddp["epoch_s"],
        "load_avg_1min": [load_before, os.getloadavg()[0]],  # a shared machine: before, after
    }
    print("\n".join(table(result)))
    if not args.smoke_test:
        out = args.out or HERE / "ray_tax.json"
        runs = _read(out)
        runs[str(result["num_samples"])] = result
        write_json(out, runs)
        print(f"wrote {out}")
    return 0


def _read(path: Path) -> dict[str, Any]:
    import json

    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


if __name__ == "__main__":
    sys.exit(main())
