"""A plain Ray Train loop on a model sharded with FSDP2, submitted to the test cluster by
test_fsdp_cluster.py:

    python tests/cluster/fsdp_loop_job.py --store S3_URI --storage S3_URI --out DIR --workers 3

Every rank ``fully_shard``-s a tiny MLP, trains it with SGD on its own generated batches, calls
``twa_ray.train.snapshot`` every ``EVERY`` steps (each rank writes its rows into the store) and
then ``twa_ray.train.learn`` on its held-out batches (its columns of B, alpha on the shards).
The driver writes what rank 0 reported to ``DIR/result.json``: alpha, whether every rank learned
the same alpha, each rank's Ray node and its count of theta's coordinates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import ray
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.train.torch import TorchTrainer

import twa_ray.train
from twa_ray.storage import open_storage

# the checkout (the job's working dir): its workers import tests.fsdp_tiny from there too
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.fsdp_tiny import batch, make_model  # noqa: E402

STEPS, EVERY = 6, 2  # 3 candidates
LEARN_STEPS = 4  # held-out batches per rank
LEARN = {"bits": 8, "lr": 0.05, "epochs": 1}


def learn_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch(100 + s, rank) for s in range(LEARN_STEPS)]


def train_loop(config: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, STEPS + 1):
        x, y = batch(step, rank)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step % EVERY == 0:  # every rank: it writes its rows
            twa_ray.train.snapshot(model, config["store"], step=step)
    twa = twa_ray.train.learn(model, config["store"], learn_batches(rank), **LEARN)
    alphas = [torch.empty_like(twa.alpha) for _ in range(world)]
    dist.all_gather(alphas, twa.alpha)
    seen: list = [None] * world
    dist.all_gather_object(seen, (ray.get_runtime_context().get_node_id(), twa.theta.numel()))
    metrics = {
        "alpha": twa.alpha.tolist(),
        "same_alpha": all(torch.equal(a, twa.alpha) for a in alphas),
        "nodes": [n for n, _ in seen],
        "theta_numel": [k for _, k in seen],
    }
    # metrics reach result.metrics only with a checkpoint (rank 0's; every rank reports)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "result.json"), "w") as f:
            json.dump(metrics, f)
        ckpt = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--storage", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=3)
    args = p.parse_args()
    result = TorchTrainer(
        train_loop,
        train_loop_config={"store": args.store},
        scaling_config=ray.train.ScalingConfig(
            num_workers=args.workers, resources_per_worker={"CPU": 1}
        ),
        run_config=ray.train.RunConfig(name="fsdp_loop", **open_storage(args.storage).train_args()),
    ).fit()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result.metrics, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
