"""TWA in a plain Ray Train loop: snapshot candidates while training, learn the average after.

    python examples/ray_train_loop.py                               # ~1 min on 2 CPUs
    python examples/ray_train_loop.py --workers 1 --epochs 20 --out runs/ray_train_loop

A ``TorchTrainer`` trains a small MLP with SGD on a classification task generated here (nothing
is downloaded). The learning-rate schedule spans ``--epochs`` epochs, but training stops at half
of them and ``twa_ray.train.snapshot`` keeps a candidate every ``--every`` steps (rank 0 writes,
idempotent by step). Then ``twa_ray.train.learn`` fits TWA-v coefficients of those candidates
on the held-out split and the script prints the test accuracy of the last SGD weights and of
TWA. The candidates stay in ``--out``/candidates: ``twa-ray average --store`` reads them too.
"""

from __future__ import annotations

import argparse
import math
import os

import ray.train
import torch
import torch.nn.functional as F
from ray.train.torch import TorchTrainer
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import twa_ray.train
from twa_ray.core.evaluate import evaluate
from twa_ray.core.layout import Layout, load_flat_
from twa_ray.store import CandidateStore

NUM_CLASSES, DIM = 4, 16


def make_splits(
    num_samples: int, seed: int = 0
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Noisy Gaussian clusters, 60% train / 20% held-out val / 20% test (the same on every call)."""
    g = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(NUM_CLASSES, DIM, generator=g)
    y = torch.randint(0, NUM_CLASSES, (num_samples,), generator=g)
    x = centers[y] + 2.0 * torch.randn(num_samples, DIM, generator=g)
    a, b = int(0.6 * num_samples), int(0.8 * num_samples)
    return TensorDataset(x[:a], y[:a]), TensorDataset(x[a:b], y[a:b]), TensorDataset(x[b:], y[b:])


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))


def train_loop_per_worker(config: dict) -> None:
    """Plain data-parallel SGD; the one TWA line is ``twa_ray.train.snapshot``."""
    ctx = ray.train.get_context()
    train, _, _ = make_splits(config["samples"])
    sampler = DistributedSampler(
        train, num_replicas=ctx.get_world_size(), rank=ctx.get_world_rank(), seed=0
    )
    loader = DataLoader(train, batch_size=32, sampler=sampler, drop_last=True)
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    total = config["epochs"] * len(loader)  # the cosine schedule spans the full budget
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
    )
    step = 0
    for epoch in range(config["epochs"] // 2):  # stop halfway: TWA finishes the training
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            step += 1
            if step % config["every"] == 0:
                twa_ray.train.snapshot(model, config["store"], step=step, epoch=step / len(loader))
        ray.train.report({"epoch": epoch + 1, "loss": loss.item()})
    twa_ray.train.snapshot(
        model, config["store"], step=step, epoch=step / len(loader)
    )  # the final weights


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/ray_train_loop", help="candidates and Ray Train storage")
    p.add_argument(
        "--epochs", type=int, default=20, help="epoch budget of the schedule (half is trained)"
    )
    p.add_argument("--every", type=int, default=10, help="snapshot every this many steps")
    p.add_argument("--samples", type=int, default=4000, help="size of the generated task")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    store = os.path.join(out, "candidates")
    config = {"store": store, "epochs": args.epochs, "every": args.every, "samples": args.samples}
    TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=args.workers, resources_per_worker={"CPU": 1}
        ),
        run_config=ray.train.RunConfig(
            name="ray_train_loop", storage_path=os.path.join(out, "ray")
        ),
    ).fit()

    _, val, test = make_splits(args.samples)
    names = CandidateStore(store).names()
    last = make_model()
    load_flat_(last, CandidateStore(store).read(names[-1]), Layout.from_module(last))
    model = make_model()
    twa = twa_ray.train.learn(
        model, store, DataLoader(val, batch_size=64, shuffle=True), bits=8, epochs=5
    )
    test_loader = DataLoader(test, batch_size=256)
    print(f"{len(names)} candidates in {store}")
    print(
        f"test accuracy: last SGD weights {evaluate(last, test_loader).acc:.4f}, "
        f"TWA-v {evaluate(model, test_loader).acc:.4f} ({twa.step_count} coefficient steps)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
