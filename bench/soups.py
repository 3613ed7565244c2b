"""Model soups at CPU scale (results: bench/RESULTS.md, "Model soups"): fuse fine-tuned variants of one model.

Per seed: an MLP is pre-trained on half of the MNIST-1D train split (the "pre-trained point"),
then K variants are fine-tuned from it on the whole train split with different learning rates,
weight decays and data orders, and saved as ``.safetensors`` files, as a user would bring them.
The product then does the rest exactly as ``twa-ray average --store FOLDER --mode v`` does
(:func:`twa_ray.average.run_average`: import into a candidate store, uniform soup (SWA), greedy
soup ranked on the held-out split, TWA-v layer-wise 4-bit). The best single variant is the one
with the best held-out accuracy (BatchNorm re-estimated like every other row).

    python bench/soups.py            # 3 seeds, K=12: ~5 min on 2 cores

Writes ``bench/soups.json`` and ``bench/soups.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import markdown_table
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Subset

from twa_ray.average import make_loaders, run_average
from twa_ray.config import DataConfig, RunConfig
from twa_ray.core.bn import update_bn
from twa_ray.core.evaluate import evaluate
from twa_ray.core.optim import lr_factor
from twa_ray.core.twa import TWAConfig
from twa_ray.data import load_dataset
from twa_ray.models import build_model

HERE = Path(__file__).resolve().parent
ROWS = ("best_single", "uniform_soup", "greedy_soup", "twa_v")
# the fine-tuning grid: (lr, weight decay); variant i also gets its own data order
GRID = list(itertools.product((0.003, 0.01, 0.03, 0.1), (0.0, 5e-4, 5e-3)))


def train(
    model: nn.Module, loader: DataLoader[Any], *, epochs: int, lr: float, weight_decay: float
) -> None:
    """SGD with momentum 0.9 on a cosine schedule over ``epochs``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, schedule="cosine"))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()


def one_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    splits = load_dataset("mnist1d", val_frac=DataConfig().val_frac, seed=seed)
    loaders = make_loaders(splits, 128, seed)
    torch.manual_seed(seed)
    model = build_model("mlp", num_classes=splits.num_classes, input_shape=splits.input_shape)
    half = Subset(splits.train, range(len(splits.train) // 2))
    gen = torch.Generator().manual_seed(seed)
    train(
        model,
        DataLoader(half, 128, shuffle=True, generator=gen),
        epochs=args.pretrain_epochs,
        lr=0.1,
        weight_decay=5e-4,
    )
    start = {k: v.clone() for k, v in model.state_dict().items()}
    folder = Path(args.work) / f"s{seed}" / "variants"
    folder.mkdir(parents=True, exist_ok=True)
    variants = {}
    for i, (lr, wd) in enumerate(GRID[: args.variants]):
        model.load_state_dict(start)
        gen = torch.Generator().manual_seed(1000 * seed + i)
        train(
            model,
            DataLoader(splits.train, 128, shuffle=True, generator=gen),
            epochs=args.finetune_epochs,
            lr=lr,
            weight_decay=wd,
        )
        name = f"ft{i:02d}_lr{lr:g}_wd{wd:g}"
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(folder / f"{name}.safetensors"),
        )
        update_bn(loaders["bn"], model)
        variants[name] = {
            "lr": lr,
            "weight_decay": wd,
            "val_acc": evaluate(model, loaders["val"]).acc,
            "test_acc": evaluate(model, loaders["test"]).acc,
        }
    best = max(variants, key=lambda n: variants[n]["val_acc"])
    cfg = RunConfig(
        data=DataConfig(model="mlp", seed=seed),
        twa=TWAConfig(blocks="tensor", bits=4),
        mode="v",
        store=str(folder),
        out=str(Path(args.work) / f"s{seed}" / "average"),
    )
    metrics = run_average(cfg)
    m = metrics["methods"]
    return {
        "seed": seed,
        "variants": variants,
        "rows": {
            "best_single": {**variants[best], "name": best},
            "uniform_soup": m["swa"],
            "greedy_soup": {k: m["greedy_soup"][k] for k in ("val_acc", "test_acc")}
            | {"kept": len(m["greedy_soup"]["kept"])},
            "twa_v": m["twa_v"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--variants", type=int, default=len(GRID), help=f"K fine-tuned variants (<= {len(GRID)})"
    )
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--work", default=str(HERE / "_work" / "soups"))
    p.add_argument("--out", default=str(HERE / "soups"), help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    if not 8 <= args.variants <= len(GRID):
        p.error(f"--variants must lie in [8, {len(GRID)}]")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # small models: a second intra-op thread costs more than it gives
    t0 = time.time()
    runs = []
    for seed in args.seeds:
        res = one_seed(seed, args)
        runs.append(res)
        accs = " ".join(f"{r} {100 * res['rows'][r]['test_acc']:.2f}" for r in ROWS)
        print(f"[{time.time() - t0:4.0f}s] seed {seed}: {accs}", flush=True)
    summary = []
    for r in ROWS:
        test = [100 * run["rows"][r]["test_acc"] for run in runs]
        val = [100 * run["rows"][r]["val_acc"] for run in runs]
        std = statistics.stdev(test) if len(test) > 1 else 0.0
        summary.append(
            {
                "method": r,
                "test_acc_mean": statistics.mean(test),
                "test_acc_std": std,
                "val_acc_mean": statistics.mean(val),
            }
        )
    mean = {s["method"]: s["test_acc_mean"] for s in summary}
    target = mean["twa_v"] >= mean["greedy_soup"] >= mean["uniform_soup"]
    rows = [
        [s["method"], f"{s['test_acc_mean']:.2f} ± {s['test_acc_std']:.2f}"]
        + [f"{s['val_acc_mean']:.2f}"]
        for s in summary
    ]
    header = ["method", "test acc % (mean ± std)", "val acc % (mean)"]
    table = "\n".join(markdown_table(header, rows))
    print(table)
    print(f"TWA-v >= greedy soup >= uniform soup: {target}")
    out = Path(args.out)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": "2-core x86_64 CPU",
        "variants": args.variants,
        "pretrain_epochs": args.pretrain_epochs,
        "finetune_epochs": args.finetune_epochs,
        "grid": GRID[: args.variants],
        "wall_time_s": round(time.time() - t0, 1),
        "summary": summary,
        "target_met": target,
        "runs": runs,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out}.json/.md in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
