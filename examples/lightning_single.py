# python examples/lightning_single.py --out /tmp/twa_lightning
# python examples/lightning_single.py --out /tmp/twa_lightning_ddp --devices 2 --strategy ddp
"""TWA as a Lightning callback on one machine: train 4 of 8 epochs ("finish early"),
snapshot every epoch, then learn the average on the val dataloader (TWA-v).

The task is generated here (a noisy 4-class problem of 32 features, labels of a random teacher
network with 20% flipped), the model is a small MLP: nothing is downloaded. Writes
``<out>/result.json`` on rank 0: alpha, the callback's final / SWA / TWA metrics on the val split
(which TWA-v fits on) and, held out from everything, the test accuracy of the final SGD weights
(the last candidate) and of the TWA model.
"""

import argparse
import copy
import json
import os

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from twa_ray.core.layout import Layout, load_flat_
from twa_ray.core.twa import TWAConfig
from twa_ray.integrations.lightning import TWACallback
from twa_ray.store import CandidateStore


def make_task(
    n_train: int = 2048,
    n_val: int = 512,
    dim: int = 32,
    classes: int = 4,
    seed: int = 0,
    n_test: int = 2048,
):
    """Train, val and test datasets: a random teacher's labels, 20% of the train labels flipped."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(dim, 64, generator=g), torch.randn(64, classes, generator=g)
    x = torch.randn(n_train + n_val, dim, generator=g)
    y = (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(1)
    flip = torch.rand(n_train, generator=g) < 0.2
    y[:n_train][flip] = torch.randint(0, classes, (int(flip.sum()),), generator=g)
    x_test = torch.randn(n_test, dim, generator=g)  # drawn last: train and val do not depend on it
    y_test = (torch.tanh(x_test @ teacher[0]) @ teacher[1]).argmax(1)
    return (
        TensorDataset(x[:n_train], y[:n_train]),
        TensorDataset(x[n_train:], y[n_train:]),
        TensorDataset(x_test, y_test),
    )


class MLP(pl.LightningModule):
    def __init__(self, dim: int = 32, hidden: int = 128, classes: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def build(args):
    """The trainer, module, loaders and callback of this example (also used by
    lightning_ray_train.py)."""
    torch.manual_seed(args.seed)
    train, val, _ = make_task(n_train=args.n_train)
    callback = TWACallback(
        args.store or os.path.join(args.out, "candidates"),
        every_n_epochs=1,
        sample_frac=0.5,
        mode="twa-v",
        config=TWAConfig(blocks="tensor", bits=8, lr=0.1, epochs=1.0),
    )
    loaders = (
        DataLoader(train, batch_size=args.batch_size, shuffle=False),
        DataLoader(val, batch_size=args.batch_size),
    )
    return MLP(), loaders, callback


def trainer_kwargs(args) -> dict:
    return dict(
        max_epochs=args.epochs,
        default_root_dir=args.out,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
        num_sanity_val_steps=0,
        logger=pl.loggers.CSVLogger(args.out, name="logs"),
    )


@torch.no_grad()
def held_out(args, callback, model) -> dict:
    """Test accuracy (a split nothing was fit on) of the final SGD weights (the last candidate),
    SWA (their mean) and the TWA model."""
    _, _, test = make_task(n_train=args.n_train)
    x, y = test.tensors
    store = CandidateStore(callback.snapshots.store)
    flats = [store.read(n) for n in callback.snapshots.names]
    models = {"twa": model}
    for name, flat in (("final", flats[-1]), ("swa", torch.stack(flats).mean(0))):
        models[name] = load_flat_(copy.deepcopy(model), flat, Layout.from_module(model))
    return {f"test/{k}_acc": float((m(x).argmax(1) == y).float().mean()) for k, m in models.items()}


def save(args, callback, trainer) -> None:
    if trainer.is_global_zero:
        result = {
            "alpha": callback.twa.alpha.flatten().tolist(),
            **callback.metrics,
            **held_out(args, callback, trainer.lightning_module),
        }
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k != "alpha"}, indent=1))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="folder for candidates, logs and result.json")
    p.add_argument(
        "--store",
        help="candidate store URI (default OUT/candidates); candidates "
        "already in it are kept (resume)",
    )
    p.add_argument("--epochs", type=int, default=8, help="max_epochs (training stops at half)")
    p.add_argument("--n-train", type=int, default=2048, help="training examples")
    p.add_argument("--batch-size", type=int, default=32, help="batch size per device")
    p.add_argument("--devices", type=int, default=1, help="CPU processes")
    p.add_argument("--strategy", default="auto", help="'auto' or 'ddp'")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    model, (train, val), callback = build(args)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        callbacks=[callback],
        **trainer_kwargs(args),
    )
    trainer.fit(model, train, val)
    save(args, callback, trainer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
