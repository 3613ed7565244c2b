"""The ``twa-ray`` command line: ``run``, ``sweep``, ``average``, ``import``.

Flags map onto the stage dataclasses of :mod:`twa_ray.config` (defaults live only there);
``--config FILE`` loads a YAML file first and flags override it. User mistakes print one line
and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser", "config_from_args", "sweep_config_from_args", "smoke_sweep"]

# write failures that mean "the disk (or the quota, or the file-size limit) is full"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# flag -> (section, field, type); section None is a top-level RunConfig field
_FLAGS: dict[str, tuple[str | None, str, Any]] = {
    "dataset": ("data", "dataset", str),
    "data_root": ("data", "data_root", str),
    "model": ("data", "model", str),
    "val_frac": ("data", "val_frac", float),
    "num_samples": ("data", "num_samples", int),
    "seed": ("data", "seed", int),
    "epochs": ("sampling", "epochs", int),
    "sample_frac": ("sampling", "sample_frac", float),
    "sample_interval": ("sampling", "sample_interval", int),
    "interval_unit": ("sampling", "interval_unit", str),
    "batch_size": ("sampling", "batch_size", int),
    "lr": ("sampling", "lr", float),
    "workers": ("sampling", "num_workers", int),
    "cpus_per_worker": ("sampling", "cpus_per_worker", float),
    "use_gpu": ("sampling", "use_gpu", bool),
    "max_failures": ("sampling", "max_failures", int),
    "subspace": ("twa", "subspace", str),
    "bits": ("twa", "bits", int),
    "blocks": ("twa", "blocks", str),
    "optimizer": ("twa", "optimizer", str),
    "twa_lr": ("twa", "lr", float),
    "twa_epochs": ("twa", "epochs", float),
    "twa_schedule": ("twa", "schedule", str),
    "twa_weight_decay": ("twa", "weight_decay", float),
    "mode": (None, "mode", str),
    "compare_full": (None, "compare_full", bool),
    "no_greedy_soup": (None, "greedy_soup", bool),
    "out": (None, "out", str),
    "store": (None, "store", str),
}

_HELP = {
    "dataset": "mnist1d | cifar10 | cifar100 | imagefolder | pkg.module:function",
    "model": "mlp | cnn1d | resnet20 | vgg16_bn | tv:<torchvision name> | pkg.module:function",
    "epochs": "full epoch budget E (the schedule spans E epochs)",
    "sample_frac": "train only sample_frac * E epochs, sampling candidates",
    "sample_interval": "snapshot every N epochs (or steps with --interval-unit step)",
    "workers": "Ray Train workers",
    "bits": "bits per code of the projection: 1, 2, 4, 8, 16, 32",
    "blocks": "coefficient blocks: model | tensor | size:N (default size:16384)",
    "mode": "t (train data), v (held-out data) or both",
    "twa_lr": "learning rate of the TWA coefficients",
    "compare_full": "also train the full budget for comparison",
    "store": "candidate store URI (run: where to write; average: what to read, or a checkpoint folder)",
}


def _add_flags(p: argparse.ArgumentParser, names: Sequence[str]) -> None:
    for name in names:
        _, _, typ = _FLAGS[name]
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            p.add_argument(flag, action="store_true", default=None, help=_HELP.get(name))
        else:
            p.add_argument(flag, type=typ, default=None, help=_HELP.get(name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twa-ray", description="Trainable Weight Averaging on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="sample with Ray Train, then TWA-t/TWA-v and baselines (the main job)")
    run.add_argument("--config", help="YAML config (flags override it)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    run.add_argument("--smoke-test", action="store_true", help="a tiny run for checks (seconds)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    run.add_argument("--overwrite", action="store_true", help="delete an earlier run in --out first")
    _add_flags(run, [n for n in _FLAGS if n != "no_greedy_soup"] + ["no_greedy_soup"])

    sw = sub.add_parser("sweep", help="Ray Tune sweep over TWA's knobs, sampling once per group of trials")
    sw.add_argument("--config", required=True, help="YAML: run config sections plus a 'sweep:' section")
    sw.add_argument("--out", required=True, help="output directory (trials table, best.yaml, sweep.png)")
    sw.add_argument("--num-samples", type=int, default=None, help="repetitions of the grid / random draws")
    sw.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: CPUs - 1)")
    sw.add_argument("--scheduler", choices=("asha", "none"), default=None, help="ASHA early stopping or none")
    sw.add_argument("--grace-period", type=int, default=None, help="ASHA: TWA epochs before a trial can stop")
    sw.add_argument("--sampling-dir", default=None, help="sampling runs (default OUT/sampling; share it to reuse runs)")
    sw.add_argument("--no-reuse", action="store_true", help="every trial samples on its own (to measure the saving)")
    sw.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    sw.add_argument("--smoke-test", action="store_true", help="tiny data and epochs, two draws (a few minutes)")
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out (Tuner.restore)")
    sw.add_argument("--overwrite", action="store_true", help="delete an earlier sweep in --out first")

    avg = sub.add_parser("average", help="TWA on an existing store or checkpoint folder, no Ray")
    avg.add_argument("--config", help="YAML config (flags override it)")
    _add_flags(avg, ["store", "dataset", "data_root", "model", "val_frac", "num_samples", "seed",
                     "mode", "subspace", "bits", "blocks", "optimizer", "twa_lr", "twa_epochs",
                     "twa_schedule", "twa_weight_decay", "no_greedy_soup", "out"])

    imp = sub.add_parser("import", help="import a folder of .pt / .safetensors checkpoints into a store")
    imp.add_argument("src", help="folder of checkpoints")
    imp.add_argument("--out", required=True, help="candidate store URI to create")
    imp.add_argument("--model", help="model whose layout the checkpoints must match (recommended)")
    imp.add_argument("--dataset", default="mnist1d", help="dataset that fixes the model's input/classes")
    imp.add_argument("--data-root", default=None)
    return parser


def config_from_args(args: argparse.Namespace, *, smoke_test: bool = False):
    """The resolved :class:`~twa_ray.config.RunConfig`: dataclass defaults < --config < flags."""
    from twa_ray.config import RunConfig, load_config

    cfg = load_config(args.config) if getattr(args, "config", None) else RunConfig()
    sections: dict[str, dict[str, Any]] = {"data": {}, "sampling": {}, "twa": {}}
    top: dict[str, Any] = {}
    if smoke_test:
        sections["data"].update(num_samples=1500)
        sections["sampling"].update(epochs=4, sample_frac=0.5, batch_size=64)
        sections["twa"].update(epochs=1.0)
        top["greedy_soup"] = False
    for name, (section, field, _) in _FLAGS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "no_greedy_soup":
            value = not value
        (top if section is None else sections[section])[field] = value
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, **sections["data"]),
        sampling=dataclasses.replace(cfg.sampling, **sections["sampling"]),
        twa=dataclasses.replace(cfg.twa, **sections["twa"]),
        **top,
    )


def sweep_config_from_args(args: argparse.Namespace):
    """The resolved :class:`~twa_ray.config.SweepConfig`: the file, then the flags."""
    from twa_ray.config import load_sweep_config

    cfg = load_sweep_config(args.config)
    options = {
        "num_samples": args.num_samples, "max_concurrent": args.max_concurrent,
        "scheduler": args.scheduler, "grace_period": args.grace_period,
        "reuse_sampling": False if args.no_reuse else None,
    }  # fmt: skip
    cfg = dataclasses.replace(cfg, **{k: v for k, v in options.items() if v is not None})
    return smoke_sweep(cfg) if args.smoke_test else cfg


def smoke_sweep(cfg: Any) -> Any:
    """The sweep at smoke size: 1500 MNIST-1D samples, enough short sampling epochs for the
    coarsest epoch interval to give 4 candidates, 2 TWA epochs, at most two draws of the space."""
    intervals = [cfg.base.sampling.sample_interval]
    spec = cfg.space.get("sampling.sample_interval")
    if isinstance(spec, dict) and next(iter(spec)) in ("grid", "choice"):
        intervals += list(next(iter(spec.values())))
    epochs = max(8, 8 * max(intervals)) if cfg.base.sampling.interval_unit == "epoch" else 8
    base = cfg.base
    base = dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, num_samples=1500),
        sampling=dataclasses.replace(base.sampling, epochs=epochs, sample_frac=0.5, batch_size=64),
        twa=dataclasses.replace(base.twa, epochs=2.0),
    )
    return dataclasses.replace(cfg, base=base, num_samples=min(cfg.num_samples, 2))


def _cmd_import(args: argparse.Namespace) -> int:
    from twa_ray.core.layout import Layout
    from twa_ray.store import import_checkpoints

    layout = None
    if args.model:
        from twa_ray.data import load_dataset
        from twa_ray.models import build_model

        splits = load_dataset(args.dataset, root=args.data_root)
        layout = Layout.from_module(build_model(args.model, num_classes=splits.num_classes, input_shape=splits.input_shape))
    names = import_checkpoints(args.src, args.out, layout=layout)
    print(f"imported {len(names)} candidates into {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        if args.command == "import":
            return _cmd_import(args)
        if args.command == "average":
            from twa_ray.average import run_average

            run_average(config_from_args(args))
            return 0
        if args.command == "sweep":
            from twa_ray.tune import run_sweep

            run_sweep(
                sweep_config_from_args(args), out=args.out, address=args.address,
                sampling_dir=args.sampling_dir, resume=args.resume, overwrite=args.overwrite,
            )  # fmt: skip
            return 0
        from twa_ray.pipeline import run_pipeline

        cfg = config_from_args(args, smoke_test=args.smoke_test)
        run_pipeline(cfg, address=args.address, resume=args.resume, overwrite=args.overwrite)
        return 0
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f"twa-ray: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        # writes are atomic (temp file + rename): what failed left no partial file behind
        where = f" writing {e.filename}" if e.filename else ""
        again = "rerun with --resume" if args.command in ("run", "sweep") else "rerun"
        print(
            f"twa-ray: error: out of disk space{where} ({errno.errorcode.get(e.errno, e.errno)}: "
            f"{os.strerror(e.errno)}); nothing half-written was kept: free space or point --out / "
            f"--store at a larger disk, then {again}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("twa-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
