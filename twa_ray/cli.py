"""The ``twa-ray`` command line: ``run``, ``sweep``, ``average``, ``import``.

Flags map onto the stage dataclasses of :mod:`twa_ray.config` (defaults live only there, and
``--help`` shows them); ``--config FILE`` loads a YAML file first, flags override it, and both are
validated by the same typed models. Every failure, here or in a Ray worker, prints one line and
never a traceback (:mod:`twa_ray.errors`): exit 2 for bad input or configuration, 1 for a runtime
failure, whose traceback goes to a log file the line names (``-v`` prints it too); Ctrl-C
(SIGINT) and SIGTERM print one line and exit with 130 and 143, the run resumable.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import inspect
import logging
import os
import re
import signal
import sys
import textwrap
import threading
import typing
from collections.abc import Sequence
from typing import Any, Literal, NoReturn

__all__ = ["main", "build_parser", "config_from_args", "sweep_config_from_args", "smoke_sweep"]

DEFAULT_OUT = {"run": "runs/twa", "average": "runs/average"}

# The config fields each command takes as flags, by dotted key (a top-level RunConfig field has
# no section). A flag's name, type, choices, help and default all come from the dataclass field:
# its name (``twa.`` fields that share a name with a data or sampling field take a ``twa-``
# prefix; a boolean that defaults to true is turned off by ``--no-<name>``), its ``Literal``
# type, its docstring and its default.
_RUN_KEYS = (
    "data.dataset",
    "data.data_root",
    "data.feature_columns",
    "data.label_column",
    "data.ingest",
    "data.model",
    "data.val_frac",
    "data.num_samples",
    "data.seed",
    "sampling.epochs",
    "sampling.sample_frac",
    "sampling.sample_interval",
    "sampling.interval_unit",
    "sampling.batch_size",
    "sampling.lr",
    "sampling.schedule",
    "sampling.num_workers",
    "sampling.cpus_per_worker",
    "sampling.use_gpu",
    "sampling.strategy",
    "sampling.max_failures",
    "sampling.checkpoint_interval_s",
    "sampling.precision",
    "sampling.ema",
    "twa.subspace",
    "twa.bits",
    "twa.blocks",
    "twa.optimizer",
    "twa.lr",
    "twa.epochs",
    "twa.schedule",
    "twa.weight_decay",
    "twa.basis_placement",
    "mode",
    "compare_full",
    "greedy_soup",
    "save",
    "out",
    "store",
    "storage",
    "shared_fs",
)
_AVERAGE_KEYS = (
    "store",
    "data.dataset",
    "data.data_root",
    "data.feature_columns",
    "data.label_column",
    "data.model",
    "data.val_frac",
    "data.num_samples",
    "data.seed",
    "mode",
    "twa.subspace",
    "twa.bits",
    "twa.blocks",
    "twa.optimizer",
    "twa.lr",
    "twa.epochs",
    "twa.schedule",
    "twa.weight_decay",
    "greedy_soup",
    "save",
    "out",
    "storage",
    "shared_fs",
    "device",
)
_SWEEP_KEYS = (
    "sweep.num_samples",
    "sweep.max_concurrent",
    "sweep.scheduler",
    "sweep.gpus_per_trial",
    "sweep.grace_period",
    "sweep.reuse_sampling",
    "storage",
    "shared_fs",
)
KEYS = {
    "run": _RUN_KEYS,
    "average": _AVERAGE_KEYS,
    "sweep": _SWEEP_KEYS,
    "import": ("data.dataset", "data.data_root", "data.feature_columns", "data.label_column"),
}

# flags whose name is not the field's
_RENAMED = {
    "sampling.num_workers": "workers",
    "sampling.checkpoint_interval_s": "checkpoint_interval",
    "sweep.reuse_sampling": "no_reuse",
}


@dataclasses.dataclass(frozen=True)
class _Option:
    """A config field as a flag."""

    key: str  # dotted config key: "sampling.epochs", "mode"
    name: str  # the flag without dashes, argparse's dest: "epochs", "no_greedy_soup"
    kind: Any  # the field's type, ``Annotated`` constraints stripped
    default: Any
    doc: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def negated(self) -> bool:
        """A boolean that is on by default: the flag turns it off."""
        return self.kind is bool and self.default is True

    @property
    def choices(self) -> tuple[str, ...] | None:
        return typing.get_args(self.kind) if typing.get_origin(self.kind) is Literal else None


def _sections() -> dict[str, type]:
    """The dataclass of each section of a dotted key ("": a top-level RunConfig field)."""
    from twa_ray.config import SECTIONS, RunConfig, SweepConfig

    return {"": RunConfig, **SECTIONS, "sweep": SweepConfig}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string literal under it), on one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(tree, ast.ClassDef)
    docs = {}
    for stmt, after in zip(tree.body, tree.body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(after.value.value.replace("``", "").split())
    return docs


@functools.cache
def option(key: str) -> _Option:
    """The flag of the config field ``key`` (a dotted key of :data:`KEYS`)."""
    sections = _sections()
    section, _, name = key.rpartition(".")
    cls = sections[section]
    default = getattr(cls(), name)  # every config dataclass has a default for each field
    kind = typing.get_type_hints(cls)[name]
    flag = name
    if section == "twa" and any(
        name in {g.name for g in dataclasses.fields(sections[s])} for s in ("data", "sampling")
    ):
        flag = f"twa_{name}"
    if kind is bool and default is True:
        flag = f"no_{flag}"
    return _Option(key, _RENAMED.get(key, flag), kind, default, field_docs(cls).get(name, ""))


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line: ``twa-ray: error: ...; see --help``."""

    def error(self, message: str) -> NoReturn:
        print(f"twa-ray: error: {message}; see '{self.prog} --help'", file=sys.stderr)
        raise SystemExit(2)


def _add_options(p: argparse.ArgumentParser, command: str, **defaults: Any) -> None:
    """The config flags of ``command``: values stay strings (the config models convert and
    validate them); the help is the field's docstring and its default (``defaults``: a
    command's own, by key)."""
    for key in KEYS[command]:
        o = option(key)
        if o.kind is bool:
            help_ = f"{o.doc} This flag turns it off." if o.negated else o.doc
            p.add_argument(o.flag, dest=o.name, action="store_true", default=None, help=help_)
            continue
        default = defaults.get(key, o.default)
        shown = "" if default is None else f" (default: {default})"
        metavar = None if o.choices else o.name.upper()
        p.add_argument(
            o.flag,
            dest=o.name,
            default=None,
            metavar=metavar,
            choices=o.choices,
            help=o.doc + shown,
        )


def _verbosity() -> argparse.ArgumentParser:
    """The flags every command takes: -v, -q, --connect-timeout."""
    verbosity = _Parser(add_help=False)
    verbosity.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logging of twa_ray",
    )
    verbosity.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="warnings and errors only",
    )
    verbosity.add_argument(
        "--connect-timeout",
        default=argparse.SUPPRESS,
        metavar="S",
        help="seconds to wait for Ray and the storage to answer (default: 60)",
    )
    return verbosity


_ADDRESS_HELP = "Ray cluster address (default: RAY_ADDRESS or a local Ray)"
_OVERWRITE_HELP = "delete an earlier twa-ray output in --out first"


def _add_run(run: argparse.ArgumentParser) -> None:
    run.add_argument("--config", help="YAML config (flags override it)")
    run.add_argument("--address", help=_ADDRESS_HELP)
    run.add_argument("--smoke-test", action="store_true", help="a tiny run for checks (seconds)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    run.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _add_options(run, "run")


def _add_sweep(sw: argparse.ArgumentParser) -> None:
    sw.add_argument(
        "--config", required=True, help="YAML: run config sections plus a 'sweep:' section"
    )
    sw.add_argument(
        "--out", required=True, help="output folder (trials table, best.yaml, sweep.png)"
    )
    sw.add_argument(
        "--sampling-dir",
        default=None,
        help="sampling runs (default: OUT/sampling; share it to reuse runs)",
    )
    sw.add_argument("--address", help=_ADDRESS_HELP)
    sw.add_argument(
        "--smoke-test", action="store_true", help="tiny data and epochs, two draws (a few minutes)"
    )
    sw.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep in --out (Tuner.restore)",
    )
    sw.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _add_options(sw, "sweep")


def _add_average(avg: argparse.ArgumentParser) -> None:
    avg.add_argument("--config", help="YAML config (flags override it)")
    avg.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _add_options(avg, "average", out=DEFAULT_OUT["average"])


def _add_import(imp: argparse.ArgumentParser) -> None:
    imp.add_argument("src", help="folder of checkpoints (or one checkpoint file)")
    imp.add_argument("--out", required=True, help="candidate store URI to create or add to")
    imp.add_argument(
        "--model",
        help="model whose layout the checkpoints must match (recommended; default: "
        "the checkpoints' own tensors, in file order)",
    )
    _add_options(imp, "import")


_COMMANDS = {
    "run": ("sample with Ray Train, then TWA-t/TWA-v and baselines (the main job)", _add_run),
    "sweep": ("Ray Tune sweep over TWA's knobs, sampling once per group of trials", _add_sweep),
    "average": ("TWA on an existing store or checkpoint folder, no Ray", _add_average),
    "import": ("import a folder of .pt / .safetensors checkpoints into a store", _add_import),
}


def build_parser() -> argparse.ArgumentParser:
    from twa_ray import __version__

    verbosity = _verbosity()
    parser = _Parser(
        prog="twa-ray", description="Trainable Weight Averaging on Ray.", parents=[verbosity]
    )
    parser.add_argument("--version", action="version", version=f"twa-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_, add) in _COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_, parents=[verbosity]))
    return parser


def _config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The YAML file's mapping (or {})."""
    from twa_ray.config import read_yaml

    return read_yaml(args.config, "config file") if getattr(args, "config", None) else {}


def _overlay(d: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` in ``d`` (a missing section is created; a malformed one, or a
    missing ``sweep:``, is left for the validator to name)."""
    section, _, name = key.rpartition(".")
    if not section:
        d[name] = value
        return
    if d.get(section) is None and section != "sweep":
        d[section] = {}
    if isinstance(d.get(section), dict):
        d[section][name] = value


def _overlay_flags(d: dict[str, Any], args: argparse.Namespace) -> dict[str, str]:
    """Overlay the flags given on the command line onto ``d``; returns dotted key -> flag."""
    given = {}
    for key in KEYS[args.command]:
        o = option(key)
        value = getattr(args, o.name, None)
        if value is not None:
            _overlay(d, key, (not value) if o.negated else value)
            given[key] = o.flag
    return given


def config_from_args(args: argparse.Namespace, *, smoke_test: bool = False):
    """The resolved :class:`~twa_ray.config.RunConfig`: dataclass defaults < --config < smoke
    sizes (:func:`~twa_ray.config.smoke_sizes`) < flags, validated as one typed config (flag
    values are named by their flag in errors)."""
    from twa_ray.config import config_from_dict, smoke_sizes

    d = _config_dict(args)
    if args.command in DEFAULT_OUT and "out" not in d:
        d["out"] = DEFAULT_OUT[args.command]
    if smoke_test:  # sized for the interval the run will use: the file's or the flag's
        probe = copy.deepcopy(d)
        planned = config_from_dict(probe, flags=_overlay_flags(probe, args))
        for key, value in smoke_sizes(planned).items():
            _overlay(d, key, value)
    return config_from_dict(d, flags=_overlay_flags(d, args))


def sweep_config_from_args(args: argparse.Namespace):
    """The resolved :class:`~twa_ray.config.SweepConfig`: the file, then the flags."""
    from twa_ray.config import sweep_config_from_dict

    d = _config_dict(args)
    cfg = sweep_config_from_dict(d, flags=_overlay_flags(d, args))
    return smoke_sweep(cfg) if args.smoke_test else cfg


def smoke_sweep(cfg: Any) -> Any:
    """The sweep at smoke size (:func:`twa_ray.config.smoke_sweep`)."""
    from twa_ray.config import smoke_sweep as at_smoke_size

    return at_smoke_size(cfg)


def _request(args: argparse.Namespace, out: str, storage: str | None = None) -> Any:
    """The outputs a command asks for, as its flags say (:class:`twa_ray.outdir.Request`)."""
    from twa_ray.outdir import Request

    return Request(
        args.command,
        out,
        storage,
        resume=getattr(args, "resume", False),
        overwrite=getattr(args, "overwrite", False),
        address=getattr(args, "address", None),
    )


def _cmd_import(args: argparse.Namespace) -> int:
    from twa_ray import outdir
    from twa_ray.core.layout import Layout
    from twa_ray.store import import_checkpoints

    data = config_from_args(args).data
    inputs = (("checkpoint", args.src), ("--data-root", data.data_root))
    with outdir.claimed(dataclasses.replace(_request(args, args.out), inputs=inputs)) as outputs:
        layout, aliases = None, None
        if args.model:
            from twa_ray.data import load_data
            from twa_ray.models import build_model
            from twa_ray.store import tied_names

            splits = load_data(data)
            model = build_model(
                args.model, num_classes=splits.num_classes, input_shape=splits.input_shape
            )
            layout, aliases = Layout.from_module(model), tied_names(model)
        outputs.claim()  # one import at a time
        imported = import_checkpoints(args.src, args.out, layout=layout, aliases=aliases)
    print(imported.summary(args.out))
    return 0


def _cmd_average(args: argparse.Namespace) -> int:
    from twa_ray.average import run_average
    from twa_ray.report import check_save

    cfg = config_from_args(args)
    check_save(cfg.save, "average")
    run_average(cfg, req=_request(args, cfg.out, cfg.storage))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from twa_ray.tune import run_sweep

    cfg = sweep_config_from_args(args)
    check_strategy(cfg.base, "sweep")
    run_sweep(cfg, _request(args, args.out, cfg.base.storage), sampling_dir=args.sampling_dir)
    return 0


def check_strategy(cfg: Any, command: str) -> None:
    """Refuse, before anything starts, what ``--strategy fsdp`` does not run yet."""
    if cfg.sampling.strategy != "fsdp":
        return
    if command == "sweep":
        raise ValueError(
            "--strategy fsdp is not supported by twa-ray sweep yet; sweep with ddp "
            "(sampling.strategy: ddp) or run one config with twa-ray run --strategy fsdp"
        )
    if cfg.compare_full:
        raise ValueError(
            "--compare-full with --strategy fsdp is not supported yet (its SGD baselines run "
            "data-parallel); drop --compare-full or use --strategy ddp"
        )


def _cmd_run(args: argparse.Namespace) -> int:
    from twa_ray.pipeline import run_pipeline
    from twa_ray.report import check_save

    cfg = config_from_args(args, smoke_test=args.smoke_test)
    check_save(cfg.save, "run")
    check_strategy(cfg, "run")
    run_pipeline(cfg, _request(args, cfg.out, cfg.storage))
    return 0


# --------------------------------------------------------------------------- signals, logging


EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""Exit code of a command stopped by a signal: 128 + the signal's number, the shell's convention."""
_GRACE_S = 5.0  # after a signal: time for a clean shutdown before the process exits anyway
_AGAIN = {
    "run": "; rerun with --resume",
    "sweep": "; rerun with --resume",
    "average": "; rerun with --overwrite",
}


class _Interrupt:
    """The signal this command received, if any (the KeyboardInterrupt it raises may reach
    :func:`main` re-raised by Ray, without it), and whether its one line was printed."""

    signum: int = signal.SIGINT
    told: bool = False

    @classmethod
    def tell(cls, command: str) -> None:
        """Print the line of an interrupted command, once: how to continue it."""
        if not cls.told:
            cls.told = True
            _say_last(f"twa-ray: interrupted{_AGAIN.get(command, '')}")

    @classmethod
    def exit_code(cls) -> int:
        return EXIT_CODES.get(signal.Signals(cls.signum), 128 + cls.signum)


def _interruptible(command: str) -> None:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler, ``timeout``, ``docker stop``, Kubernetes) at
    any phase: raise KeyboardInterrupt in the main thread (Ray Train's polling loop then
    unwinds, and Ray is shut down), and exit with 128 + the signal after a few seconds (at once
    on a second signal) even if something blocks. Writes are atomic, so whatever is cut short
    leaves no half-written file. (``ray.init`` would replace the SIGTERM handler:
    :func:`twa_ray.ray.ray_internals.keep_signal_handlers` keeps it.)"""

    def handler(signum: int, frame: Any) -> None:
        def force() -> None:
            _Interrupt.tell(command)
            os._exit(_Interrupt.exit_code())

        _Interrupt.signum = signum
        timer = threading.Timer(_GRACE_S, force)
        timer.daemon = True
        timer.start()
        for s in EXIT_CODES:
            signal.signal(s, lambda *_: force())
        raise KeyboardInterrupt(signal.Signals(signum).name)

    _Interrupt.signum, _Interrupt.told = signal.SIGINT, False
    if threading.current_thread() is threading.main_thread():
        for s in EXIT_CODES:
            signal.signal(s, handler)


class _Console(logging.StreamHandler):
    """Progress (below WARNING, twa_ray's only) to stdout, problems to stderr: stderr holds
    nothing but what went wrong. Looks the streams up at each record (they may be replaced)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and not (
            record.name == "twa_ray" or record.name.startswith("twa_ray.")
        ):
            return  # other libraries' debug and info lines
        self.stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        super().emit(record)


def _setup_logging(args: argparse.Namespace) -> None:
    level = (
        logging.DEBUG
        if getattr(args, "verbose", False)
        else logging.WARNING
        if getattr(args, "quiet", False)
        else logging.INFO
    )
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
# cleaner failing to pick between several Ray instances on one machine (it retries on its own), a
# Train worker's process-group set-up line
_RAY_NOISE = re.compile(
    r"PreemptionWatcher|logging\.cc:\d+: Set ray log level|Found multiple active Ray instances"
    r"|Setting up process group for"
)


_SAID_LAST = threading.Event()
"""Set once the command printed its last line (an error, or how to continue an interrupted
run): the lines Ray still forwards from its workers while it shuts down are dropped, so that
line stays last."""


def _say_last(line: str) -> None:
    """Print the command's last line on stderr; Ray's forwarded lines stop before it."""
    _SAID_LAST.set()
    print(line, file=sys.stderr, flush=True)


def _ray_noise(record: dict[str, Any], line: str) -> bool:
    """A line of Ray's own that says nothing the command does not say itself (``-v`` shows
    everything): Ray Train's controller (worker group starts, retry decisions, error snippets:
    a failure is one ``twa-ray: error:`` line) and its worker set-up lines; and any line once
    the command's last line is out (:data:`_SAID_LAST`)."""
    actor = record.get("actor_name")
    return (
        _SAID_LAST.is_set()
        or actor == "TrainController"
        or bool(actor == "PlacementGroupCleaner" and record.get("is_err"))
        or bool(_RAY_NOISE.search(line))
    )


def _filter_ray_logs() -> None:
    from twa_ray.ray.logs import quiet_trial_errors
    from twa_ray.ray.ray_internals import filter_driver_logs

    filter_driver_logs(_ray_noise)
    quiet_trial_errors()  # a failed trial's traceback goes to the log file, not the console


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


def _fail(e: Exception, args: argparse.Namespace, out: str | None) -> int:
    """The one line of a failure, wherever it was raised (here or in a Ray worker), with the
    path of the log file that holds its traceback; returns the exit code of its class (2: bad
    input or configuration, 1: a runtime failure). ``-v`` also prints the traceback."""
    from twa_ray.errors import RUNTIME, TwaError, describe, write_log

    line = _startup_timeout(e)
    if line is not None:
        _say_last(f"twa-ray: error: {line}")
        return 2
    again = "rerun with --resume" if args.command in ("run", "sweep") else "rerun"
    error = describe(e, again=again, where=out)
    if getattr(args, "verbose", False) and error.details:
        print(error.details, file=sys.stderr, end="")
    # a bad input found here is its line alone; what failed in a run keeps its traceback
    path = write_log(error, out) if isinstance(e, TwaError) or error.kind == RUNTIME else None
    where = f" (traceback: {path})" if path else ""
    _say_last(f"twa-ray: error: {error.line}{where}")
    return error.exit_code


def _prepare(args: argparse.Namespace) -> tuple[Any, str | None]:
    """Before a command: credentials redacted on the console, ``--connect-timeout`` in the
    environment (read by Ray's and the storage's waits), logging and signals; returns what
    :func:`_restore` puts back (the console streams, the connect timeout)."""
    from twa_ray import redact

    redact.install()  # no credential in a log record of this process
    streams = redact.mask_console()  # nor on the console, whoever prints it
    timeout_env = os.environ.get("TWA_RAY_CONNECT_TIMEOUT")
    if hasattr(args, "connect_timeout"):
        os.environ["TWA_RAY_CONNECT_TIMEOUT"] = args.connect_timeout
    _SAID_LAST.clear()
    _setup_logging(args)
    _interruptible(args.command)
    return streams, timeout_env


def _restore(*, ray_was_up: bool, streams: Any, timeout_env: str | None) -> None:
    """Leave the process as :func:`main` found it: Ray (when it started it), the console
    streams, the connect timeout and the signal handlers (each command releases its outputs:
    :func:`twa_ray.outdir.claimed`)."""
    if _ray_up() and not ray_was_up:
        try:
            sys.modules["ray"].shutdown()
        except KeyboardInterrupt:
            pass
    sys.stdout, sys.stderr = streams
    if timeout_env is None:
        os.environ.pop("TWA_RAY_CONNECT_TIMEOUT", None)
    else:
        os.environ["TWA_RAY_CONNECT_TIMEOUT"] = timeout_env
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2, already printed)
        return int(e.code or 0)
    ray_was_up = _ray_up()  # a caller's Ray (tests, notebooks) is left running
    streams, timeout_env = _prepare(args)
    out = getattr(args, "out", None) or DEFAULT_OUT.get(args.command)  # where the log goes
    try:
        from twa_ray.storage import connect_timeout

        connect_timeout()  # a bad --connect-timeout is one line here
        commands = {
            "import": _cmd_import,
            "average": _cmd_average,
            "sweep": _cmd_sweep,
            "run": _cmd_run,
        }
        return commands[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see _interruptible); --resume continues
        _Interrupt.tell(args.command)
        return _Interrupt.exit_code()
    except Exception as e:
        return _fail(e, args, out)
    finally:
        _restore(ray_was_up=ray_was_up, streams=streams, timeout_env=timeout_env)


if __name__ == "__main__":
    sys.exit(main())
