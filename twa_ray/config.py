"""Typed configuration of each stage: one frozen dataclass per stage, defaults only here.

YAML files and CLI flags map onto these dataclasses (:func:`load_config`), validated by pydantic
from the dataclasses' own type hints: unambiguous numeric strings are coerced (``"1e-3"`` -> 0.001,
``"40"`` -> 40), booleans come only from booleans, and every other mismatch is one error naming
the key and the expected type. Bounds and choices are declared on the fields (``Literal``,
``Annotated[float, Range(...)]``) and checked once, in ``__post_init__``, by
:func:`twa_ray.core.checks.check_fields`: every value out of range is named (with its flag when
it came from one) in one line. ``twa-ray``'s flags, choices and help are generated from these
fields (:mod:`twa_ray.cli`). Every output directory gets the resolved config next to it.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Annotated, Any, Literal

from twa_ray.core.checks import INT64_MAX, ConfigError, Range, check_fields
from twa_ray.core.twa import TWAConfig

__all__ = [
    "DataConfig",
    "SamplingConfig",
    "RunConfig",
    "SweepConfig",
    "ConfigError",
    "SPACE_KINDS",
    "load_config",
    "config_from_dict",
    "load_sweep_config",
    "sweep_config_from_dict",
    "Smoke",
    "SMOKE_RUN",
    "SMOKE_SWEEP",
    "smoke_sizes",
    "smoke_sweep",
    "with_keys",
]


def _fraction(*, closed_hi: bool = False) -> Range:
    return Range(gt=0, le=1) if closed_hi else Range(gt=0, lt=1)


_POSITIVE = Range(gt=0, lt=math.inf)  # finite and > 0
_NON_NEGATIVE = Range(ge=0, lt=math.inf)  # finite and >= 0
_CPUS = Range(gt=0, le=1024)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Dataset and model."""

    dataset: str = "mnist1d"
    """'mnist1d' (generated), 'cifar10', 'cifar100', 'imagefolder' (local files), 'parquet',
    'images', 'hf_disk' (read from --data-root, any storage URI), or 'pkg.module:function'."""
    data_root: str | None = None
    """Local root of CIFAR / ImageFolder files (never downloaded); for parquet / images / hf_disk
    a local folder or a storage URI such as s3://bucket/prefix?endpoint_override=..."""
    feature_columns: str | None = None
    """parquet / hf_disk: the feature column(s), comma-separated (default: every column but the
    label)."""
    label_column: str = "label"
    """parquet / hf_disk: the integer class column."""
    ingest: Literal["auto", "stream", "stream_worker_decode", "memory"] = "auto"
    """parquet / images / hf_disk: 'stream' reads the training split with Ray Data in every
    epoch, images decoded in its CPU tasks ('stream_worker_decode': in the training worker);
    'memory' loads the whole dataset into each worker (faster: a dataset read once);
    'auto' streams only a dataset over the object-store shipping limit (256 MiB)."""
    model: str = "cnn1d"
    """'cnn1d' (the 1-D CNN with BatchNorm: the main job), 'mlp', 'resnet20', 'vgg16_bn',
    'tv:<torchvision name>', or 'pkg.module:function'."""
    val_frac: Annotated[float, _fraction()] = 0.1
    """Fraction of the training split held out for validation (never trained on)."""
    num_samples: Annotated[int, Range(ge=100)] | None = None
    """MNIST-1D: total generated samples (None: 4,000, the main job: a task SGD does not
    saturate, bench/protocol_free.md; 12,500 is the package's size); other datasets: keep the
    first this many training rows (None: all)."""
    seed: Annotated[int, Range(ge=0, le=INT64_MAX)] = 0
    """Seed of the data split, model init and data order."""

    def __post_init__(self) -> None:
        if self.num_samples is None and self.dataset == "mnist1d":
            object.__setattr__(self, "num_samples", MNIST1D_SAMPLES)
        check_fields(self, "data config")


MNIST1D_SAMPLES = 4000
"""MNIST-1D samples of the main job (2,880 train / 320 val / 800 test)."""


# sampling options that do not change the trajectory: a resume may change them, and sweep
# trials that differ only in them share one sampling run
TRAJECTORY_FREE_FIELDS = ("cpus_per_worker", "max_failures", "checkpoint_interval_s")


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """The sampling phase: data-parallel SGD on the full-budget schedule, snapshotting candidates."""

    epochs: Annotated[int, Range(ge=1)] = 20
    """Full epoch budget E: the learning-rate schedule spans E epochs."""
    sample_frac: Annotated[float, _fraction(closed_hi=True)] = 0.5
    """Train only the first sample_frac * E epochs (the saving); candidates come from these."""
    sample_interval: Annotated[int, Range(ge=1)] = 1
    """Snapshot every this many epochs (interval_unit='epoch') or steps ('step')."""
    interval_unit: Literal["epoch", "step"] = "epoch"
    """Unit of sample_interval."""
    batch_size: Annotated[int, Range(ge=1)] = 128
    """Global batch size (split across workers)."""
    lr: Annotated[float, _POSITIVE] = 0.1
    """Peak SGD learning rate (scaled for the global batch)."""
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9
    """SGD momentum."""
    weight_decay: Annotated[float, _NON_NEGATIVE] = 5e-4
    """SGD weight decay."""
    schedule: Literal["cosine", "linear", "step", "constant", "multistep", "flat_cosine"] = (
        "multistep"
    )
    """Learning-rate schedule over the full budget E ('multistep': x0.1 at 1/2 and 3/4, the TWA
    paper's, chosen on a selection split by bench/protocol.py; 'step': x0.1 at 1/3 and 2/3;
    'flat_cosine': constant for 1/2, then cosine to 0)."""
    warmup_epochs: Annotated[float, _NON_NEGATIVE] = 0.0
    """Linear warm-up length in epochs."""
    num_workers: Annotated[int, Range(ge=1)] = 2
    """Ray Train workers."""
    use_gpu: bool = False
    """One GPU per worker (nccl) instead of CPU (gloo)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How the workers hold the model while sampling: 'ddp' (each a full copy) or 'fsdp' (FSDP2
    fully_shard: each rank a dim-0 shard of every parameter, snapshots written per rank)."""
    cpus_per_worker: Annotated[float, _CPUS] = 1.0
    """CPUs reserved per Train worker (fractions allowed: 0.5 fits 2 workers + a Tune trial on 2 CPUs)."""
    max_failures: Annotated[int, Range(ge=0)] = 1
    """Worker failures tolerated: the run restarts from the last Ray Train checkpoint."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Arithmetic of the forward and backward passes: fp32, or bf16 autocast (weights, optimizer
    and candidates stay float32)."""
    ema: bool = True
    """Keep exponential moving averages of the weights during sampling (rank 0; decays
    0.99 / 0.998 / 0.9995 per step, the ``ema`` baseline, chosen on val)."""
    checkpoint_interval_s: Annotated[float, _NON_NEGATIVE] = 10.0
    """Ray Train checkpoints of both phases (sampling: at an epoch end; coefficients: every 50
    steps or at a pass end) at most once per this many seconds, plus one at each phase's end;
    0: at every epoch / pass end. A failure replays at most this much work."""

    def __post_init__(self) -> None:
        check_fields(self, "sampling config")

    @property
    def sample_epochs(self) -> int:
        """Epochs actually trained: ceil(sample_frac * E), at least 1."""
        return max(1, math.ceil(self.sample_frac * self.epochs - 1e-9))


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One end-to-end run: sample -> subspace -> TWA-t / TWA-v -> baselines -> report."""

    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    twa: TWAConfig = field(default_factory=TWAConfig)
    mode: Literal["t", "v", "both"] = "both"
    """TWA-t (train data), TWA-v (held-out validation data) or both."""
    compare_full: bool = False
    """Also train the full budget E for comparison."""
    greedy_soup: bool = True
    """Compute the greedy-soup baseline (2K evaluations)."""
    save: Literal["auto", "twa_v", "twa_t", "ema", "swa", "sgd_sampled", "last_candidate"] = "auto"
    """Method written to model.safetensors: auto (the best on the hold part of val among TWA-t,
    TWA-v, EMA, SWA and the last iterate; metrics.json says why) or one of them by name."""
    out: str = "runs/twa"
    """Output directory (local path; ``twa-ray average`` defaults to runs/average)."""
    store: str | None = None
    """Candidate store URI: where run writes the candidates (default: <out>/candidates), what
    average reads (a store, or a folder of .pt / .safetensors checkpoints)."""
    storage: str | None = None
    """One storage URI for every artifact: a local/NFS path or any pyarrow.fs URI such as
    s3://bucket/prefix?endpoint_override=...; default: a local folder under --out."""
    shared_fs: bool = False
    """--storage is a local path that every Ray node mounts (NFS)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Device of ``twa-ray average`` (``twa-ray run`` puts its workers on GPUs with use_gpu)."""

    def __post_init__(self) -> None:
        errors = [] if self.out else ["out is empty; name an output folder"]
        if self.save in ("twa_t", "twa_v") and self.mode not in ("both", self.save[-1]):
            errors.append(f"save={self.save} with mode={self.mode}: that variant is not fitted")
        if self.save == "ema" and not self.sampling.ema:
            errors.append("save=ema with sampling.ema=false: the run keeps no EMA; drop one")
        check_fields(self, "run config", errors)

    @property
    def store_uri(self) -> str:
        return self.store or f"{self.out.rstrip('/')}/candidates"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SECTIONS = {"data": DataConfig, "sampling": SamplingConfig, "twa": TWAConfig}
"""The sections of a :class:`RunConfig` (YAML ``data:``, ``sampling:``, ``twa:``) by name."""


# what a pydantic error type expects, in words
_EXPECTED = {
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dataclass_type": "a mapping of options",
    "dict_type": "a mapping",
    "mapping_type": "a mapping",
}


_WORDS = {bool: "true or false", int: "an integer", float: "a number"}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A dataclass's field types, ``Annotated`` bounds stripped."""
    return typing.get_type_hints(cls)


def _scalar(hint: Any) -> type | None:
    """``bool``, ``int`` or ``float`` for a field of that type (optional or not), else None."""
    args = (
        set(typing.get_args(hint)) - {type(None)} if isinstance(hint, types.UnionType) else {hint}
    )
    kind = next(iter(args)) if len(args) == 1 else None
    return kind if kind in _WORDS else None


def _check_types(cls: type, d: Any, prefix: str, flags: Mapping[str, str]) -> None:
    """Unknown keys, and what pydantic's lax mode would accept but a config must not: a
    boolean only from a boolean (``use_gpu: "no"`` is not False), a number never from one."""
    if not isinstance(d, Mapping):
        raise ValueError(
            _type_error(prefix.rstrip(".") or "config", "a mapping of options", d, flags)
        )
    hints = _hints(cls)
    unknown = sorted(str(k) for k in set(d) - set(hints))
    if unknown:
        where = f" in '{prefix.rstrip('.')}'" if prefix else ""
        raise ValueError(f"unknown option(s) {unknown}{where}; known: {sorted(hints)}")
    for key, value in d.items():
        hint = hints[key]
        kind = _scalar(hint)
        if kind is not None and value is not None and (kind is bool) != isinstance(value, bool):
            raise ValueError(_type_error(prefix + key, _WORDS[kind], value, flags))
        if (
            isinstance(hint, type)
            and hasattr(hint, "__dataclass_fields__")
            and not isinstance(value, hint)
        ):
            _check_types(hint, value, f"{prefix}{key}.", flags)


def _type_error(key: str, expected: str, value: Any, flags: Mapping[str, str]) -> str:
    flag = f" ({flags[key]})" if key in flags else ""
    where = flags[key] if key in flags else f"'{key}' in the config file"
    return f"config key '{key}'{flag}: expected {expected}, got {value!r}; fix {where}"


def _validate(cls: type, d: Mapping[str, Any], flags: Mapping[str, str], prefix: str = "") -> Any:
    """``cls`` (a config dataclass) from ``d`` via pydantic, errors as one ``ValueError`` line."""
    from pydantic import TypeAdapter, ValidationError

    _check_types(cls, d, prefix, flags)
    try:
        return TypeAdapter(cls).validate_python(dict(d))
    except ValidationError as exc:
        e = exc.errors(include_url=False)[0]
        where = prefix + "".join(f"{p}." for p in e["loc"])
        if e["type"] == "value_error":  # raised by a __post_init__: already a full sentence
            error = e["ctx"]["error"]
            raise ValueError(
                error.render(where, flags) if isinstance(error, ConfigError) else str(error)
            ) from None
        key = prefix + ".".join(str(p) for p in e["loc"])
        expected = _EXPECTED.get(e["type"])
        if e["type"] == "literal_error":
            expected = f"one of {e['ctx']['expected']}"
        raise ValueError(
            _type_error(key, expected or e["msg"].lower(), e["input"], flags)
        ) from None


def config_from_dict(d: Mapping[str, Any], *, flags: Mapping[str, str] | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from nested dicts (``{"data": {...}, "sampling": {...},
    "twa": {...}, "mode": ...}``), reporting unknown keys and type errors by name.

    ``flags``: dotted key -> CLI flag, named in errors for values that came from flags."""
    if isinstance(d, Mapping):  # an empty section (``twa:`` with nothing under it) is the defaults
        d = {k: {} if k in SECTIONS and v is None else v for k, v in d.items()}
    return _validate(RunConfig, d, flags or {})


def read_yaml(path: str, what: str) -> dict[str, Any]:
    """The mapping in a YAML file, with one clear error for a missing or malformed file."""
    import yaml

    try:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} does not exist; check the path") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path!r} is a folder; pass --config a YAML file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path!r} is not a text file; pass --config a YAML file") from None
    except OSError as e:
        raise ValueError(
            f"cannot read {what} {path!r} ({e.strerror}); pass --config a readable YAML file"
        ) from None
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise ValueError(f"{what} {path!r} is not valid YAML ({first}); fix the file") from None
    if not isinstance(d, dict):
        raise ValueError(f"{what} {path!r} must hold a mapping of sections")
    return d


def load_config(path: str) -> RunConfig:
    """Read a YAML config file into a :class:`RunConfig`."""
    return config_from_dict(read_yaml(path, "config file"))


# --------------------------------------------------------------------------- sweeps

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform")
"""How a swept knob is written in YAML: ``{grid: [..]}`` (every value, crossed with the other
grids), ``{choice: [..]}`` (one at random per sample), ``{uniform: [lo, hi]}``,
``{loguniform: [lo, hi]}``."""

# options that are resources, not knobs: sweeping them would only change how a trial runs
_NOT_KNOBS = {"sampling.cpus_per_worker", "sampling.max_failures"}


def _knob_names() -> dict[str, str]:
    """Every sweepable knob by its dotted name (``twa.lr``), plus the top-level ``mode``."""
    names = {
        f"{sec}.{f.name}": f"{sec}.{f.name}" for sec, cls in SECTIONS.items() for f in fields(cls)
    }
    names["mode"] = "mode"
    return {k: v for k, v in names.items() if k not in _NOT_KNOBS}


def resolve_knob(name: str) -> str:
    """The dotted name of a knob: ``twa.lr`` as is, or a bare field name that only one section
    has (``bits`` -> ``twa.bits``; ``lr`` is ambiguous)."""
    known = _knob_names()
    if name in known:
        return name
    matches = sorted(k for k in known if k.split(".")[-1] == name)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"knob {name!r} is ambiguous: write one of {matches}")
    raise ValueError(
        f"unknown knob {name!r}; use section.field from {sorted(known)} (resource options "
        f"{sorted(_NOT_KNOBS)} are not knobs)"
    )


def _is_domain(v: Any) -> bool:
    """A Ray Tune search-space object (tune.loguniform(...), tune.grid_search(...)) from Python."""
    if isinstance(v, Mapping):
        return set(v) == {"grid_search"}
    return type(v).__module__.startswith("ray.tune")


def _check_spec(name: str, spec: Any) -> str | None:
    """An error message for a malformed space, or None."""
    if _is_domain(spec):
        return None
    if not (isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in SPACE_KINDS):
        return (
            f"{name}: {spec!r} is not a search space; write {{grid: [..]}}, {{choice: [..]}}, "
            "{uniform: [lo, hi]} or {loguniform: [lo, hi]} (fixed values go in the base sections)"
        )
    kind, values = next(iter(spec.items()))
    if not isinstance(values, (list, tuple)) or not values:
        return f"{name}: {kind} needs a non-empty list, got {values!r}"
    if kind in ("uniform", "loguniform"):
        ok = len(values) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        )
        if not ok or not values[0] < values[1]:
            return f"{name}: {kind} needs [lo, hi] with lo < hi, got {list(values)!r}"
        if kind == "loguniform" and values[0] <= 0:
            return f"{name}: loguniform needs lo > 0, got {values[0]!r}"
    return None


def _flatten_space(space: Mapping[str, Any], errors: list[str]) -> dict[str, Any]:
    """``{twa: {lr: spec}}`` and ``{twa.lr: spec}`` both become ``{"twa.lr": spec}``."""
    flat: dict[str, Any] = {}
    for key, value in space.items():
        is_section = key in SECTIONS and isinstance(value, Mapping) and not _is_domain(value)
        if is_section and not (len(value) == 1 and next(iter(value)) in SPACE_KINDS):
            items = [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            items = [(str(key), value)]
        for name, spec in items:
            try:
                knob = resolve_knob(name)
            except ValueError as e:
                errors.append(str(e))
                continue
            if knob in flat:
                errors.append(f"knob {knob!r} is given twice")
            problem = _check_spec(knob, spec)
            if problem:
                errors.append(problem)
            flat[knob] = spec
    return flat


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """A Ray Tune sweep over the knobs of a :class:`RunConfig` (``twa-ray sweep``).

    Trials that share their sampling knobs share one sampling run: it samples at the finest
    interval (and, with ``interval_unit='epoch'``, up to the largest ``sample_frac``) once, and
    each trial takes the candidates that its own interval and fraction would have written.
    """

    base: RunConfig = field(default_factory=RunConfig)
    """The config every trial starts from; the space overrides its knobs."""
    space: Mapping[str, Any] = field(default_factory=dict)
    """Knob (``twa.lr``, ``sampling.sample_interval``, ``mode``, or a bare unique field name) ->
    space (``{grid: [..]}``, ``{choice: [..]}``, ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``,
    or a ``ray.tune`` search-space object)."""
    num_samples: Annotated[int, Range(ge=1)] = 1
    """Repetitions of the grid; random spaces are drawn anew for each (Ray Tune semantics)."""
    scheduler: Literal["asha", "none"] = "asha"
    """ASHA early stopping on the selection accuracy, or run every trial to the end."""
    grace_period: Annotated[int, Range(ge=1)] = 1
    """ASHA: TWA epochs every trial runs before it can be stopped."""
    reduction_factor: Annotated[float, Range(gt=1, lt=math.inf)] = 2.0
    """ASHA: keep the top 1/reduction_factor of the trials at each rung."""
    max_concurrent: Annotated[int, Range(ge=1)] | None = None
    """Trials at once (None: the cluster's CPUs minus one, over cpus_per_trial; 1 on 2 CPUs)."""
    cpus_per_trial: Annotated[float, _CPUS] = 1.0
    """CPUs reserved per trial (its TWA phase runs in the trial's process with this many threads)."""
    gpus_per_trial: Annotated[float, Range(ge=0, le=64)] = 0.0
    """GPUs reserved per trial (> 0: the trial's TWA phase runs on its GPU; fractions share one)."""
    metric: Literal["val_acc"] = "val_acc"
    """The selection metric (mode max): accuracy on the selection part of the val split.
    Test accuracy is reported, never used for selection."""
    select_frac: Annotated[float, _fraction()] = 0.5
    """Fraction of the val split held out for selection; TWA-v trials fit on the rest."""
    seed: Annotated[int, Range(ge=0, le=2**32 - 1)] = 0
    """Seed of the random draws of the space (numpy's RandomState: 32 bits)."""
    reuse_sampling: bool = True
    """Share sampling runs between trials (False: every trial samples on its own, for comparison)."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        if not isinstance(self.base, RunConfig):
            errors.append(f"base must be a RunConfig, got {type(self.base).__name__}")
        object.__setattr__(self, "space", _flatten_space(dict(self.space or {}), errors))
        check_fields(self, "sweep config", errors)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-friendly: the base config, the space (Tune objects as their repr), options."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("base", "space")}
        space = {k: (v if isinstance(v, Mapping) else repr(v)) for k, v in self.space.items()}
        return {"base": self.base.to_dict(), "space": space, **d}


def sweep_config_from_dict(
    d: Mapping[str, Any], *, flags: Mapping[str, str] | None = None
) -> SweepConfig:
    """A :class:`SweepConfig` from a run config dict with a ``sweep:`` section
    (``{"data": .., "sampling": .., "twa": .., "mode": .., "sweep": {"space": .., ...}}``)."""
    d = dict(d)
    sweep = d.pop("sweep", None)
    if not isinstance(sweep, Mapping):
        raise ValueError("a sweep config needs a 'sweep:' section with a 'space:' of knobs")
    names = {f.name for f in fields(SweepConfig)} - {"base"}
    bad = sorted(str(k) for k in set(sweep) - names)
    if bad:
        raise ValueError(f"unknown option(s) {bad} in 'sweep'; known: {sorted(names)}")
    if not isinstance(sweep.get("space", {}), Mapping):
        raise ValueError(_type_error("sweep.space", "a mapping of knobs", sweep["space"], {}))
    base = config_from_dict(d, flags=flags)
    return _validate(SweepConfig, {**sweep, "base": base}, flags or {}, prefix="sweep.")


def load_sweep_config(path: str) -> SweepConfig:
    """Read a YAML sweep file: the sections of a run config plus ``sweep:``."""
    return sweep_config_from_dict(read_yaml(path, "sweep config"))


# --------------------------------------------------------------------------- smoke sizes


@dataclass(frozen=True)
class Smoke:
    """The sizes of a ``--smoke-test`` (seconds on a laptop): small data and batches, and a
    sampling run just long enough for the coarsest epoch interval in play to give
    ``candidates`` candidates (``sample_frac`` of the budget)."""

    num_samples: int = 1500
    sample_frac: float = 0.5
    batch_size: int = 64
    candidates: int = 2  # at the coarsest sample_interval (epochs; a step interval: its epochs)
    twa_epochs: float = 1.0
    greedy_soup: bool = False
    draws: int | None = None  # a sweep: at most this many draws of the space


SMOKE_RUN = Smoke()
"""``twa-ray run --smoke-test`` (and jobs/run_twa.py): two candidates, one TWA epoch."""
SMOKE_SWEEP = Smoke(candidates=4, twa_epochs=2.0, draws=2)
"""``twa-ray sweep --smoke-test``: four candidates to choose among, two TWA epochs, two draws."""


def smoke_sizes(
    cfg: RunConfig, size: Smoke = SMOKE_RUN, *, intervals: Sequence[int] = ()
) -> dict[str, Any]:
    """The dotted config keys a smoke test sets on ``cfg``. The epochs adapt to the coarsest of
    ``cfg``'s ``sample_interval`` and ``intervals`` (a sweep's), so that a config a smoke sweep
    ran (its ``best.yaml``) runs again at smoke size with the same candidates per interval."""
    s = cfg.sampling
    per_interval = round(size.candidates / size.sample_frac)  # epochs that give one candidate each
    coarsest = max([s.sample_interval, *intervals]) if s.interval_unit == "epoch" else 1
    return {
        "data.num_samples": size.num_samples,
        "sampling.epochs": per_interval * max(coarsest, 1),
        "sampling.sample_frac": size.sample_frac,
        "sampling.batch_size": size.batch_size,
        "twa.epochs": size.twa_epochs,
        "greedy_soup": size.greedy_soup,
    }


def with_keys(cfg: RunConfig, keys: Mapping[str, Any]) -> RunConfig:
    """``cfg`` with the dotted ``keys`` replaced (``"sampling.epochs"``, ``"greedy_soup"``)."""
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in keys.items():
        section, _, name = key.rpartition(".")
        (sections.setdefault(section, {}) if section else top)[name] = value
    parts = {k: replace(getattr(cfg, k), **v) for k, v in sections.items()}
    return replace(cfg, **parts, **top)


def smoke_sweep(cfg: SweepConfig, size: Smoke = SMOKE_SWEEP) -> SweepConfig:
    """The sweep at smoke size (:func:`smoke_sizes` over the space's epoch intervals too)."""
    spec = cfg.space.get("sampling.sample_interval")
    intervals: list[int] = []
    if isinstance(spec, dict) and next(iter(spec)) in ("grid", "choice"):
        intervals = list(next(iter(spec.values())))
    base = with_keys(cfg.base, smoke_sizes(cfg.base, size, intervals=intervals))
    draws = cfg.num_samples if size.draws is None else min(cfg.num_samples, size.draws)
    return replace(cfg, base=base, num_samples=draws)
