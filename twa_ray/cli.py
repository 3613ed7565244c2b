"""The ``twa-ray`` command line: ``run``, ``sweep``, ``average``, ``import``.

Flags map onto the stage dataclasses of :mod:`twa_ray.config` (defaults live only there, and
``--help`` shows them); ``--config FILE`` loads a YAML file first, flags override it, and both are
validated by the same typed models. User mistakes print one line and exit with code 2, never a
traceback; Ctrl-C prints one line and exits with 130, the run resumable.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "build_parser", "config_from_args", "sweep_config_from_args", "smoke_sweep"]

# write failures that mean "the disk (or the quota, or the file-size limit) is full"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

DEFAULT_OUT = {"run": "runs/twa", "average": "runs/average"}

# flag -> (section, field); section None is a top-level RunConfig field
_FLAGS: dict[str, tuple[str | None, str]] = {
    "dataset": ("data", "dataset"),
    "data_root": ("data", "data_root"),
    "model": ("data", "model"),
    "val_frac": ("data", "val_frac"),
    "num_samples": ("data", "num_samples"),
    "seed": ("data", "seed"),
    "epochs": ("sampling", "epochs"),
    "sample_frac": ("sampling", "sample_frac"),
    "sample_interval": ("sampling", "sample_interval"),
    "interval_unit": ("sampling", "interval_unit"),
    "batch_size": ("sampling", "batch_size"),
    "lr": ("sampling", "lr"),
    "workers": ("sampling", "num_workers"),
    "cpus_per_worker": ("sampling", "cpus_per_worker"),
    "use_gpu": ("sampling", "use_gpu"),
    "max_failures": ("sampling", "max_failures"),
    "checkpoint_interval": ("sampling", "checkpoint_interval_s"),
    "precision": ("sampling", "precision"),
    "subspace": ("twa", "subspace"),
    "bits": ("twa", "bits"),
    "blocks": ("twa", "blocks"),
    "optimizer": ("twa", "optimizer"),
    "twa_lr": ("twa", "lr"),
    "twa_epochs": ("twa", "epochs"),
    "twa_schedule": ("twa", "schedule"),
    "twa_weight_decay": ("twa", "weight_decay"),
    "basis_placement": ("twa", "basis_placement"),
    "mode": (None, "mode"),
    "compare_full": (None, "compare_full"),
    "no_greedy_soup": (None, "greedy_soup"),
    "out": (None, "out"),
    "store": (None, "store"),
    "storage": (None, "storage"),
    "shared_fs": (None, "shared_fs"),
    "device": (None, "device"),
}
_BOOL_FLAGS = {"use_gpu", "compare_full", "no_greedy_soup", "shared_fs"}
_CHOICES = {
    "interval_unit": ("epoch", "step"), "subspace": ("affine", "span"), "optimizer": ("sgd", "adamw"),
    "twa_schedule": ("constant", "step", "linear", "cosine"), "mode": ("t", "v", "both"),
    "basis_placement": ("replicate", "shard", "auto"), "device": ("cpu", "cuda"),
    "precision": ("fp32", "bf16"),
}  # fmt: skip

_HELP = {
    "dataset": "mnist1d (generated) | cifar10 | cifar100 | imagefolder | pkg.module:function",
    "data_root": "local folder of the CIFAR / ImageFolder files (never downloaded)",
    "model": "mlp | cnn1d | resnet20 | vgg16_bn | tv:<torchvision name> | pkg.module:function",
    "val_frac": "fraction of the training split held out for validation",
    "num_samples": "MNIST-1D: samples generated (default: the package's)",
    "seed": "seed of the data split, the model init and the data order",
    "epochs": "full epoch budget E (the learning-rate schedule spans E epochs)",
    "sample_frac": "train only sample_frac * E epochs, sampling candidates",
    "sample_interval": "snapshot every N epochs (or steps with --interval-unit step)",
    "interval_unit": "unit of --sample-interval",
    "batch_size": "global batch size of SGD (split across the workers) and TWA",
    "lr": "peak SGD learning rate of the sampling phase",
    "workers": "Ray Train workers",
    "cpus_per_worker": "CPUs reserved per Ray Train worker (fractions allowed)",
    "use_gpu": "one GPU per worker (nccl) instead of CPU (gloo)",
    "max_failures": "worker failures tolerated (restart from the last Ray Train checkpoint)",
    "checkpoint_interval": "seconds between Ray Train checkpoints (at most; each phase's end "
    "always checkpoints; 0: every epoch / coefficient pass)",
    "subspace": "affine: layer-wise deltas around the mean; span: orthonormal basis",
    "bits": "bits per code of the projection: 1, 2, 4, 8, 16, 32",
    "blocks": "coefficient blocks: model | tensor | size:N",
    "optimizer": "optimizer of the TWA coefficients",
    "twa_lr": "peak learning rate of the TWA coefficients",
    "twa_epochs": "TWA epochs (passes over the training data; fractions allowed)",
    "twa_schedule": "learning-rate schedule of the TWA coefficients",
    "twa_weight_decay": "decay of the coefficients towards the SWA point",
    "basis_placement": "basis in the coefficient group: a copy per worker, sharded, or chosen by size",
    "mode": "t (fit on train data), v (on held-out data) or both",
    "compare_full": "also train the full budget E for comparison",
    "no_greedy_soup": "skip the greedy-soup baseline (2K evaluations)",
    "out": "output folder (owned: refused when it holds anything else)",
    "store": "candidate store URI (run: where to write, default OUT/candidates; average: what to read, "
    "or a folder of checkpoints)",
    "storage": "one storage URI for every artifact: a local/NFS path or a pyarrow.fs URI "
    "(s3://bucket/prefix?endpoint_override=...); default: a local folder under --out",
    "shared_fs": "--storage is a local path that every Ray node mounts (NFS)",
    "precision": "sampling arithmetic: fp32, or bf16 autocast on the forward/backward (GPU workers)",
    "device": "device of the averaging (cuda: the model, B and the batches on the GPU)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _defaults() -> dict[str, Any]:
    """Each flag's default, from the config dataclasses."""
    from twa_ray.config import RunConfig

    cfg = RunConfig()
    out = {}
    for name, (section, field) in _FLAGS.items():
        value = getattr(cfg if section is None else getattr(cfg, section), field)
        out[name] = (not value) if name == "no_greedy_soup" else value
    return out


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line: ``twa-ray: error: ...; see --help``."""

    def error(self, message: str) -> NoReturn:
        print(f"twa-ray: error: {message}; see '{self.prog} --help'", file=sys.stderr)
        raise SystemExit(2)


def _add_flags(p: argparse.ArgumentParser, names: Sequence[str], defaults: dict[str, Any], **override: Any) -> None:
    """Config flags: values stay strings (the config models convert and validate them); the
    help shows the dataclass default."""
    for name in names:
        default = override.get(name, defaults[name])
        shown = "" if default is None or name in _BOOL_FLAGS else f" (default: {default})"
        help_ = _HELP[name] + shown
        if name in _BOOL_FLAGS:
            p.add_argument(_flag(name), action="store_true", default=None, help=help_)
        else:
            p.add_argument(_flag(name), default=None, metavar=None if name in _CHOICES else name.upper(), choices=_CHOICES.get(name), help=help_)


def build_parser() -> argparse.ArgumentParser:
    from twa_ray import __version__

    defaults = _defaults()
    verbosity = _Parser(add_help=False)
    verbosity.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging of twa_ray")
    verbosity.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and errors only")
    verbosity.add_argument("--connect-timeout", default=argparse.SUPPRESS, metavar="S",
                           help="seconds to wait for Ray and the storage to answer (default: 60)")  # fmt: skip
    parser = _Parser(prog="twa-ray", description="Trainable Weight Averaging on Ray.", parents=[verbosity])
    parser.add_argument("--version", action="version", version=f"twa-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, parents=[verbosity])

    run = command("run", "sample with Ray Train, then TWA-t/TWA-v and baselines (the main job)")
    run.add_argument("--config", help="YAML config (flags override it)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    run.add_argument("--smoke-test", action="store_true", help="a tiny run for checks (seconds)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    run.add_argument("--overwrite", action="store_true", help="delete an earlier twa-ray output in --out first")
    _add_flags(run, [n for n in _FLAGS if n != "device"], defaults)

    sw = command("sweep", "Ray Tune sweep over TWA's knobs, sampling once per group of trials")
    sw.add_argument("--config", required=True, help="YAML: run config sections plus a 'sweep:' section")
    sw.add_argument("--out", required=True, help="output folder (trials table, best.yaml, sweep.png)")
    sw.add_argument("--num-samples", default=None, help="repetitions of the grid / random draws (default: 1)")
    sw.add_argument("--max-concurrent", default=None, help="trials at once (default: CPUs - 1)")
    sw.add_argument("--scheduler", choices=("asha", "none"), default=None, help="ASHA early stopping or none (default: asha)")
    sw.add_argument("--gpus-per-trial", default=None, help="GPUs reserved per trial; > 0 runs its TWA phase on the GPU (default: 0)")
    sw.add_argument("--grace-period", default=None, help="ASHA: TWA epochs before a trial can stop (default: 1)")
    sw.add_argument("--sampling-dir", default=None, help="sampling runs (default: OUT/sampling; share it to reuse runs)")
    sw.add_argument("--no-reuse", action="store_true", help="every trial samples on its own (to measure the saving)")
    sw.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    sw.add_argument("--smoke-test", action="store_true", help="tiny data and epochs, two draws (a few minutes)")
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out (Tuner.restore)")
    sw.add_argument("--overwrite", action="store_true", help="delete an earlier twa-ray output in --out first")
    _add_flags(sw, ["storage", "shared_fs"], defaults)

    avg = command("average", "TWA on an existing store or checkpoint folder, no Ray")
    avg.add_argument("--config", help="YAML config (flags override it)")
    avg.add_argument("--overwrite", action="store_true", help="delete an earlier twa-ray output in --out first")
    _add_flags(avg, ["store", "dataset", "data_root", "model", "val_frac", "num_samples", "seed",
                     "mode", "subspace", "bits", "blocks", "optimizer", "twa_lr", "twa_epochs",
                     "twa_schedule", "twa_weight_decay", "no_greedy_soup", "out", "storage", "shared_fs", "device"],
               defaults, out=DEFAULT_OUT["average"])  # fmt: skip

    imp = command("import", "import a folder of .pt / .safetensors checkpoints into a store")
    imp.add_argument("src", help="folder of checkpoints (or one checkpoint file)")
    imp.add_argument("--out", required=True, help="candidate store URI to create or add to")
    imp.add_argument("--model", help="model whose layout the checkpoints must match (recommended; default: "
                     "the checkpoints' own tensors, in file order)")  # fmt: skip
    imp.add_argument("--dataset", default="mnist1d", help="dataset that fixes the model's input/classes (default: mnist1d)")
    imp.add_argument("--data-root", default=None, help=_HELP["data_root"])
    return parser


def _config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The YAML file's mapping (or {})."""
    from twa_ray.config import _read_yaml

    return _read_yaml(args.config, "config file") if getattr(args, "config", None) else {}


def _overlay(d: dict[str, Any], section: str | None, field: str, value: Any) -> None:
    """Set ``d[section][field]`` (a malformed section is left for the validator to name)."""
    if section is None:
        d[field] = value
        return
    sec = d.get(section)
    if sec is None:
        sec = d[section] = {}
    if isinstance(sec, dict):
        sec[field] = value


def _flag_names() -> dict[str, str]:
    return {(f"{s}.{f}" if s else f): _flag(n) for n, (s, f) in _FLAGS.items()}


def config_from_args(args: argparse.Namespace, *, smoke_test: bool = False):
    """The resolved :class:`~twa_ray.config.RunConfig`: dataclass defaults < --config < flags,
    validated as one typed config (flag values are named by their flag in errors)."""
    from twa_ray.config import config_from_dict

    d = _config_dict(args)
    if smoke_test:
        for (section, field), smoke in {
            ("data", "num_samples"): 1500, ("sampling", "epochs"): 4, ("sampling", "sample_frac"): 0.5,
            ("sampling", "batch_size"): 64, ("twa", "epochs"): 1.0, (None, "greedy_soup"): False,
        }.items():  # fmt: skip
            _overlay(d, section, field, smoke)
    if getattr(args, "command", None) in DEFAULT_OUT and "out" not in d:
        d["out"] = DEFAULT_OUT[args.command]
    given = {}
    for name, (section, field) in _FLAGS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "no_greedy_soup":
            value = not value
        _overlay(d, section, field, value)
        given[f"{section}.{field}" if section else field] = _flag(name)
    return config_from_dict(d, flags=given)


def sweep_config_from_args(args: argparse.Namespace):
    """The resolved :class:`~twa_ray.config.SweepConfig`: the file, then the flags."""
    from twa_ray.config import sweep_config_from_dict

    d = _config_dict(args)
    sweep = d.setdefault("sweep", None)
    options = {
        "num_samples": args.num_samples, "max_concurrent": args.max_concurrent,
        "scheduler": args.scheduler, "grace_period": args.grace_period,
        "gpus_per_trial": args.gpus_per_trial, "reuse_sampling": False if args.no_reuse else None,
    }  # fmt: skip
    given = {}
    if isinstance(sweep, dict):
        for k, v in options.items():
            if v is not None:
                sweep[k] = v
                given[f"sweep.{k}"] = _flag(k) if k != "reuse_sampling" else "--no-reuse"
    for name in ("storage", "shared_fs"):
        if getattr(args, name, None) is not None:
            d[name] = getattr(args, name)
            given[name] = _flag(name)
    cfg = sweep_config_from_dict(d, flags=given)
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
    from twa_ray import outdir
    from twa_ray.core.layout import Layout
    from twa_ray.storage import open_storage
    from twa_ray.store import import_checkpoints

    outdir.check_inputs(args.out, [("checkpoint", args.src), ("--data-root", args.data_root)])
    layout, aliases = None, None
    if args.model:
        from twa_ray.data import load_dataset
        from twa_ray.models import build_model
        from twa_ray.store import tied_names

        splits = load_dataset(args.dataset, root=args.data_root)
        model = build_model(args.model, num_classes=splits.num_classes, input_shape=splits.input_shape)
        layout, aliases = Layout.from_module(model), tied_names(model)
    outdir.hold(open_storage(args.out, create=False), "import", flag=f"--out {args.out!r}")  # one import at a time
    print(import_checkpoints(args.src, args.out, layout=layout, aliases=aliases).summary(args.out))
    return 0


def _cmd_average(args: argparse.Namespace) -> int:
    from twa_ray.average import run_average

    run_average(config_from_args(args), overwrite=args.overwrite)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from twa_ray import outdir
    from twa_ray.tune import run_sweep

    cfg = sweep_config_from_args(args)
    outdir.check_inputs(args.out, [("--data-root", cfg.base.data.data_root)])
    # --resume with --storage continues from the storage alone: a new --out is fine
    resume = outdir.resume_out(args.out, cfg.base.storage, args.resume)
    outdir.check(args.out, "sweep", resume=resume, overwrite=args.overwrite)
    outdir.lock(args.out)  # one writer at a time; the sweep claims --out with its --storage
    _interruptible()
    _local_ray_defaults(args.address)
    run_sweep(
        cfg, out=args.out, address=args.address, sampling_dir=args.sampling_dir, resume=args.resume,
        overwrite=args.overwrite,
    )  # fmt: skip
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from twa_ray import outdir
    from twa_ray.pipeline import run_pipeline

    cfg = config_from_args(args, smoke_test=args.smoke_test)
    outdir.check_inputs(cfg.out, [("--data-root", cfg.data.data_root)])
    resume = outdir.resume_out(cfg.out, cfg.storage, args.resume)
    outdir.check(cfg.out, "run", resume=resume, overwrite=args.overwrite)
    _interruptible()
    _local_ray_defaults(args.address)
    run_pipeline(cfg, address=args.address, resume=args.resume, overwrite=args.overwrite)
    return 0


# --------------------------------------------------------------------------- signals, logging


def _local_ray_defaults(address: str | None) -> None:
    """On a local Ray (no ``--address`` / ``RAY_ADDRESS``) nothing is preempted: Ray Train's
    preemption watcher (one more actor, and its ``core_worker.cc`` error line) is not started."""
    if address is None and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

INTERRUPTED = "twa-ray: interrupted; rerun with --resume"
_GRACE_S = 5.0  # after Ctrl-C: time for a clean shutdown before the process exits anyway


def _interruptible() -> None:
    """Ctrl-C (SIGINT) or SIGTERM at any phase: raise KeyboardInterrupt in the main thread (Ray
    Train's polling loop then unwinds), and exit with 130 after a few seconds even if something
    blocks. Writes are atomic, so whatever is cut short leaves no half-written file."""

    def handler(signum: int, frame: Any) -> None:
        def force() -> None:
            print(INTERRUPTED, file=sys.stderr, flush=True)
            os._exit(130)

        timer = threading.Timer(_GRACE_S, force)
        timer.daemon = True
        timer.start()
        signal.signal(signal.SIGINT, lambda *_: force())  # a second Ctrl-C: exit now
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    # Ray Train's fit() and Ray Tune's fit() install SIGINT handlers of their own that stop only
    # the current worker group or trial and then return, so that the next phase would start:
    # the whole command stops instead
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    if hasattr(DataParallelTrainer, "_register_sigint_handler"):
        DataParallelTrainer._register_sigint_handler = lambda self, controller: None  # type: ignore[method-assign]


class _Console(logging.StreamHandler):
    """Progress (below WARNING, twa_ray's only) to stdout, problems to stderr: stderr holds
    nothing but what went wrong. Looks the streams up at each record (they may be replaced)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and not (record.name == "twa_ray" or record.name.startswith("twa_ray.")):
            return  # other libraries' debug and info lines
        self.stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        super().emit(record)


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    root = logging.getLogger()
    if not any(isinstance(h, _Console) for h in root.handlers):
        root.addHandler(_Console())
    root.setLevel(logging.WARNING)
    logging.getLogger("twa_ray").setLevel(level)
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "fsspec", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "verbose", False) and args.command in ("run", "sweep"):
        _filter_ray_logs()


# Ray-internal lines that Ray forwards from its processes and that say nothing about the run: the
# core worker's PreemptionWatcher error, log-level notices, and Ray Train's placement-group
# cleaner failing to pick between several Ray instances on one machine (it retries on its own)
_RAY_NOISE = re.compile(r"PreemptionWatcher|logging\.cc:\d+: Set ray log level|Found multiple active Ray instances")


def _filter_ray_logs() -> None:
    """Drop :data:`_RAY_NOISE` from the worker logs that Ray prints on the driver (``-v`` keeps
    everything). Wraps the printer that ``ray.init`` installs, so it must run before it."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "_twa_ray", False):
        return

    def filtered(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("actor_name") == "PlacementGroupCleaner" and data.get("is_err"):
            return
        lines = [line for line in data.get("lines", []) if not _RAY_NOISE.search(line)]
        if lines:
            original({**data, "lines": lines}, ignore_prefix)

    filtered._twa_ray = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = filtered


# --------------------------------------------------------------------------- errors

def _startup_timeout(e: BaseException) -> str | None:
    """One line for a Ray Train worker group that could not be placed in time, or None."""
    failure = getattr(e, "controller_failure", None)
    if type(failure).__name__ != "WorkerGroupStartupTimeoutError":
        return None
    have = ""
    try:
        import ray

        if ray.is_initialized():
            r = ray.cluster_resources()
            have = f"; the cluster has {r.get('CPU', 0):g} CPUs and {r.get('GPU', 0):g} GPUs"
    except Exception:  # the cluster is gone: say what was asked only
        pass
    timeout = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    return (
        f"Ray Train could not place {getattr(failure, 'num_workers', '?')} workers within {timeout} s{have}; "
        "lower --workers / --cpus-per-worker, drop --use-gpu, add nodes, or on a slow cluster raise "
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
    )


def _ray_up() -> bool:
    return "ray" in sys.modules and bool(sys.modules["ray"].is_initialized())


def _user_error(e: BaseException) -> str:
    from twa_ray.redact import redact

    text = redact(" ".join(str(e).split()))  # one line, whatever the message held; no credential
    return f"twa-ray: error: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2, already printed)
        return int(e.code or 0)
    from twa_ray import redact

    streams = redact.install()  # no credential reaches the console, whoever prints it
    timeout_env = os.environ.get("TWA_RAY_CONNECT_TIMEOUT")
    if hasattr(args, "connect_timeout"):
        os.environ["TWA_RAY_CONNECT_TIMEOUT"] = args.connect_timeout  # read by Ray's and the storage's waits
    _setup_logging(args)
    out = getattr(args, "out", None) or DEFAULT_OUT.get(args.command)
    created = [] if out is None or "://" in str(out) or os.path.exists(out) else [Path(os.path.abspath(out))]
    from twa_ray import outdir

    ray_was_up = _ray_up()  # a caller's Ray (tests, notebooks) is left running
    failed = True
    try:
        from twa_ray.storage import connect_timeout

        connect_timeout()  # a bad --connect-timeout is one line here
        commands = {"import": _cmd_import, "average": _cmd_average, "sweep": _cmd_sweep, "run": _cmd_run}
        rc = commands[args.command](args)
        failed = False
        return rc
    except KeyboardInterrupt:
        failed = False  # what ran is kept: --resume continues it
        print(INTERRUPTED if args.command in ("run", "sweep") else "twa-ray: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(_user_error(e), file=sys.stderr)
        return 2
    except OSError as e:
        from twa_ray.storage import storage_fault

        if e.errno not in _DISK_FULL and storage_fault(e) is not None:
            print(f"twa-ray: error: {storage_fault(e)}", file=sys.stderr)
            return 2
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
    except Exception as e:
        from twa_ray.storage import storage_fault

        line = _startup_timeout(e) or storage_fault(e)
        if line is None:
            raise
        print(f"twa-ray: error: {line}", file=sys.stderr)
        return 2
    finally:
        if _ray_up() and not ray_was_up:
            try:
                sys.modules["ray"].shutdown()
            except KeyboardInterrupt:
                pass
        outdir.release_all(failed=failed, created=created)
        sys.stdout, sys.stderr = streams
        if timeout_env is None:
            os.environ.pop("TWA_RAY_CONNECT_TIMEOUT", None)
        else:
            os.environ["TWA_RAY_CONNECT_TIMEOUT"] = timeout_env
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
