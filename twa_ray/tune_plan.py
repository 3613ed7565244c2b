"""The plan of a sweep (driver, no Ray): the space checked value by value and drawn into trials,
the trials grouped by the sampling run they share, each trial's candidates. One typed
:class:`SweepPlan`, written to ``plan.json`` and read back by ``--resume`` through
:meth:`SweepPlan.to_dict` / :meth:`SweepPlan.from_dict` only.

The space is drawn with Ray Tune's documented semantics (``grid_search`` crossed, ``num_samples``
repeats the grid and draws the random knobs anew; Tune's ``BasicVariantGenerator``), made here
rather than by Tune because the sampling runs must be known before any trial starts: the grid
knobs crossed in knob-name order (the first name varies fastest), then per trial the random
knobs in the space's order from one ``numpy.random.RandomState(seed)``: the draws Tune makes
with that random state, so a sweep file plans the same trials as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from twa_ray.config import (
    TRAJECTORY_FREE_FIELDS,
    DataConfig,
    RunConfig,
    SamplingConfig,
    SweepConfig,
    config_from_dict,
)
from twa_ray.storage import join_uri
from twa_ray.store.arrow import CandidateInfo

__all__ = [
    "PlannedTrial",
    "SamplingGroup",
    "SweepPlan",
    "check_space",
    "draw_trials",
    "plan_sweep",
    "select_candidates",
]

_RANGES = ("uniform", "loguniform")
_GRIDS = ("grid", "grid_search")  # ours (YAML) and tune.grid_search's dict


# --------------------------------------------------------------------------- the typed plan


@dataclass(frozen=True, kw_only=True)
class SamplingGroup:
    """One sampling run that several trials share."""

    key: str
    """Hash of the run's data and sampling configs: names its folder, found again by it."""
    data: DataConfig
    sampling: SamplingConfig
    """The longest member's config at the group's finest interval (the gcd of its members')."""
    run_dir: str
    trials: tuple[int, ...]

    @property
    def run_id(self) -> str:
        return f"sweep-{self.key}"

    @property
    def store(self) -> str:
        return join_uri(self.run_dir, "candidates")

    @property
    def sample_epochs(self) -> int:
        return self.sampling.sample_epochs


@dataclass(frozen=True, kw_only=True)
class PlannedTrial:
    """One trial: its knob values, the full run config they give, its sampling group."""

    index: int
    params: Mapping[str, Any]
    config: RunConfig
    group: str
    candidates: tuple[str, ...] = ()
    """Chosen from the group's store once its sampling run has finished."""

    @property
    def sample_epochs(self) -> int:
        return self.config.sampling.sample_epochs

    @property
    def twa_epochs(self) -> float:
        return self.config.twa.epochs


@dataclass(frozen=True, kw_only=True)
class SweepPlan:
    """The resolved trials and sampling groups of one sweep, and the options a trial runs with."""

    trials: tuple[PlannedTrial, ...]
    """Indexed by :attr:`PlannedTrial.index` (``trials[i].index == i``)."""
    groups: Mapping[str, SamplingGroup]
    space: Mapping[str, Any]
    """The space as planned (JSON form): ``--resume`` warns when the space given then differs."""
    cpus_per_trial: float
    gpus_per_trial: float
    select_frac: float
    sweep_id: str = ""

    def with_candidates(self, chosen: Mapping[int, Sequence[str]]) -> SweepPlan:
        """The plan with each trial's candidates (trial index -> names)."""
        trials = tuple(
            dataclasses.replace(t, candidates=tuple(chosen[t.index])) for t in self.trials
        )
        return dataclasses.replace(self, trials=trials)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (``plan.json``); :meth:`from_dict` reads it back."""
        return {
            "sweep_id": self.sweep_id,
            "space": dict(self.space),
            "cpus_per_trial": self.cpus_per_trial,
            "gpus_per_trial": self.gpus_per_trial,
            "select_frac": self.select_frac,
            "groups": {
                k: {
                    "key": g.key,
                    "run_dir": g.run_dir,
                    "trials": list(g.trials),
                    "data": asdict(g.data),
                    "sampling": asdict(g.sampling),
                }
                for k, g in self.groups.items()
            },
            "trials": [
                {
                    "index": t.index,
                    "params": dict(t.params),
                    "group": t.group,
                    "candidates": list(t.candidates),
                    "config": t.config.to_dict(),
                }
                for t in self.trials
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepPlan:
        """The plan that :meth:`to_dict` gave; ``ValueError`` for anything else."""
        try:
            groups = {
                k: SamplingGroup(
                    key=g["key"],
                    run_dir=g["run_dir"],
                    trials=tuple(g["trials"]),
                    data=DataConfig(**g["data"]),
                    sampling=SamplingConfig(**g["sampling"]),
                )
                for k, g in d["groups"].items()
            }
            trials = tuple(
                PlannedTrial(
                    index=t["index"],
                    params=t["params"],
                    group=t["group"],
                    candidates=tuple(t["candidates"]),
                    config=config_from_dict(t["config"]),
                )
                for t in d["trials"]
            )
            return cls(
                trials=trials,
                groups=groups,
                space=d["space"],
                sweep_id=d["sweep_id"],
                cpus_per_trial=d["cpus_per_trial"],
                gpus_per_trial=d["gpus_per_trial"],
                select_frac=d["select_frac"],
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"the saved sweep plan is not one this version writes (missing or bad {e}); "
                "start the sweep anew with --overwrite"
            ) from None


# --------------------------------------------------------------------------- the space


def _is_grid(spec: Any) -> bool:
    return isinstance(spec, Mapping) and next(iter(spec)) in _GRIDS


def _draw(spec: Any, rng: np.random.RandomState) -> Any:
    """One value of a random knob, drawn as Ray Tune's ``choice`` / ``uniform`` / ``loguniform``
    draw it from ``rng``; a Ray Tune search-space object draws itself."""
    if not isinstance(spec, Mapping):
        value = spec.sample(random_state=rng)
        return value.item() if isinstance(value, np.generic) else value
    kind, values = next(iter(spec.items()))
    if kind == "choice":
        return values[rng.choice(np.arange(len(values)), size=1)[0]]
    lo, hi = values
    if kind == "uniform":
        return float(rng.uniform(lo, hi, size=1)[0])
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi), size=1))[0])  # loguniform


def draw_trials(space: Mapping[str, Any], *, num_samples: int, seed: int) -> list[dict[str, Any]]:
    """The knob values of every trial: the grid knobs crossed, ``num_samples`` times, the random
    knobs drawn anew for each trial (Ray Tune's semantics, see the module docstring).

    >>> draw_trials({"b": {"grid": [1, 2]}, "a": {"grid": ["x", "y"]}}, num_samples=1, seed=0)
    [{'b': 1, 'a': 'x'}, {'b': 1, 'a': 'y'}, {'b': 2, 'a': 'x'}, {'b': 2, 'a': 'y'}]
    """
    rng = np.random.RandomState(seed)
    grids = sorted((k, list(next(iter(s.values())))) for k, s in space.items() if _is_grid(s))
    names = [k for k, _ in reversed(grids)]  # itertools.product varies its last factor fastest
    trials = []
    for _ in range(num_samples):
        for point in itertools.product(*(values for _, values in reversed(grids))):
            fixed = dict(zip(names, point))
            drawn = {k: _draw(s, rng) for k, s in space.items() if k not in fixed}
            trials.append({k: fixed[k] if k in fixed else drawn[k] for k in space})
    return trials


def _apply(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` (a run config dict) with the knobs set: ``{"twa.lr": 0.1}`` -> ``d["twa"]["lr"]``."""
    d = json.loads(json.dumps(base))
    for knob, value in params.items():
        if "." in knob:
            section, name = knob.split(".", 1)
            d[section][name] = value
        else:
            d[knob] = value
    return d


def _knob_type(knob: str) -> Any:
    """The type hint of a knob's field (``twa.lr`` -> ``float``)."""
    hints = typing.get_type_hints(RunConfig)
    section, _, name = knob.rpartition(".")
    if section:
        hints = typing.get_type_hints(hints[section])
    return hints[name]


def _takes_floats(hint: Any) -> bool:
    args = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    return float in args


def _values_of(hint: Any) -> str:
    """What a field of type ``hint`` takes, in words: ``integer values``, ``one of ['t', 'v']``."""
    if typing.get_origin(hint) is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    args = (
        set(typing.get_args(hint)) - {type(None)} if isinstance(hint, types.UnionType) else {hint}
    )
    words = {int: "integer", bool: "true/false", str: "string"}
    return (
        " or ".join(sorted(words.get(a, getattr(a, "__name__", str(a))) for a in args)) + " values"
    )


def _flow(spec: Any) -> str:
    """A space as written in YAML: ``{choice: [3, 4]}``."""
    import yaml

    if not isinstance(spec, Mapping):
        return repr(spec)
    return yaml.safe_dump(dict(spec), default_flow_style=True, width=10**6).strip()


def _bad_value(
    base: Mapping[str, Any], knob: str, value: Any, others: Mapping[str, Any]
) -> str | None:
    """Why the run config refuses ``knob=value``, or None. The value is tried on the base, and
    where the base refuses it, once more with the other knobs at their first values (a value
    may need another knob's: ``blocks`` with ``subspace``); refused only if both refuse."""
    problem = None
    for context in ({}, others):
        try:
            config_from_dict(_apply(base, {**context, knob: value}))
            return None
        except (ValueError, TypeError) as e:
            problem = problem or str(e)
    return problem


def check_space(base: RunConfig, space: Mapping[str, Any]) -> None:
    """Every value of the space as its knob would take it: each ``grid`` / ``choice`` value and
    each range's two bounds, validated by the run config itself (the base with that value);
    ``uniform`` / ``loguniform`` only on knobs that take fractional numbers.

    Raises:
        ValueError: one line naming each bad knob, its space and the value refused.
    """
    d = base.to_dict()
    firsts = {k: next(iter(s.values()))[0] for k, s in space.items() if isinstance(s, Mapping)}
    errors = []
    for knob, spec in space.items():
        if not isinstance(spec, Mapping):
            continue  # a Ray Tune object: its draws are checked trial by trial
        kind, values = next(iter(spec.items()))
        others = {k: v for k, v in firsts.items() if k != knob}
        if kind in _RANGES and not _takes_floats(_knob_type(knob)):
            errors.append(
                f"{knob}: {_flow(spec)}: {kind} draws fractional numbers but {knob} "
                f"takes {_values_of(_knob_type(knob))}; use {{choice: [..]}} or {{grid: [..]}}"
            )
            continue
        for value in [float(v) for v in values] if kind in _RANGES else values:
            problem = _bad_value(d, knob, value, others)
            if problem:
                what = "bound" if kind in _RANGES else "value"
                errors.append(f"{knob}: {_flow(spec)}: the {what} {value!r} is refused ({problem})")
                break
    if errors:
        raise ValueError("invalid sweep space: " + "; ".join(errors) + "; fix the sweep: section")


# --------------------------------------------------------------------------- the plan


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _trial_space(cfg: SweepConfig) -> dict[str, Any]:
    space = dict(cfg.space)
    if cfg.base.mode == "both" and "mode" not in space:
        space["mode"] = {"grid": ["t", "v"]}  # a trial trains one model: 'both' means try both
    return space


def _num_candidates(s: SamplingConfig) -> int | None:
    """Candidates a run with epoch intervals writes (every ``sample_interval``-th epoch plus the
    last); None for step intervals (known once the data is)."""
    if s.interval_unit != "epoch":
        return None
    return s.sample_epochs // s.sample_interval + (s.sample_epochs % s.sample_interval != 0)


def _resolve_trials(base: RunConfig, drawn: Iterable[dict[str, Any]]) -> list[PlannedTrial]:
    """Each drawn trial's run config, its group still unset; every invalid trial reported."""
    trials, errors = [], []
    d = base.to_dict()
    for i, params in enumerate(drawn):
        try:
            run = config_from_dict(_apply(d, params))
        except (ValueError, TypeError) as e:
            errors.append(f"trial {i} {params}: {e}")
            continue
        if run.mode not in ("t", "v"):
            errors.append(f"trial {i}: mode={run.mode!r}; a trial trains one model: 't' or 'v'")
        count = _num_candidates(run.sampling)
        if count is not None and count < 2:
            s = run.sampling
            errors.append(
                f"trial {i} {params}: sample_interval={s.sample_interval} epochs over "
                f"{s.sample_epochs} sampled epochs gives {count} candidate; TWA needs at least 2"
            )
        trials.append(PlannedTrial(index=i, params=params, config=run, group=""))
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ValueError("invalid sweep: " + "; ".join(errors[:5]) + more)
    return trials


def _sharing_key(run: RunConfig) -> dict[str, Any]:
    """What trials sharing one sampling run agree on: every sampling knob except the interval
    (and, for epoch intervals, the fraction) and the options that leave the trajectory alone."""
    s = asdict(run.sampling)
    for name in ("sample_interval", *TRAJECTORY_FREE_FIELDS):
        s.pop(name)
    if run.sampling.interval_unit == "epoch":
        s.pop("sample_frac")
    return {"data": asdict(run.data), "sampling": s}


def _make_group(
    members: Sequence[PlannedTrial], *, sampling_dir: str, reuse: bool
) -> SamplingGroup:
    """The one run of ``members``: the longest member's config at the finest interval that
    holds every member's snapshots (and, for epoch intervals, the last epoch of every shorter
    member: a run always snapshots its final epoch)."""
    runs = [m.config for m in members]
    longest = max(runs, key=lambda r: (r.sampling.sample_epochs, r.sampling.sample_frac))
    e_max = longest.sampling.sample_epochs
    parts = [r.sampling.sample_interval for r in runs]
    if longest.sampling.interval_unit == "epoch":
        parts += [r.sampling.sample_epochs for r in runs if r.sampling.sample_epochs < e_max]
    sampling = dataclasses.replace(longest.sampling, sample_interval=math.gcd(*parts))
    ident = {"data": asdict(longest.data), "sampling": asdict(sampling)}
    for name in TRAJECTORY_FREE_FIELDS:
        ident["sampling"].pop(name)
    if not reuse:
        ident["trial"] = members[0].index
    key = _hash(ident)
    return SamplingGroup(
        key=key,
        data=longest.data,
        sampling=sampling,
        run_dir=join_uri(sampling_dir, key),
        trials=tuple(m.index for m in members),
    )


def plan_sweep(cfg: SweepConfig, *, sampling_dir: str) -> SweepPlan:
    """Check the space, draw the trials and group them by sampling run (pure: no Ray, nothing
    written). The plan's ``sweep_id`` is left empty (the sweep's claim of its output sets it).

    Raises:
        ValueError: a value of the space or a trial config is invalid, or a trial would get
            fewer than 2 candidates.
    """
    space = _trial_space(cfg)
    check_space(cfg.base, space)
    trials = _resolve_trials(
        cfg.base, draw_trials(space, num_samples=cfg.num_samples, seed=cfg.seed)
    )
    by_key: dict[str, list[PlannedTrial]] = {}
    for t in trials:
        key = _sharing_key(t.config) | ({} if cfg.reuse_sampling else {"trial": t.index})
        by_key.setdefault(_hash(key), []).append(t)
    groups = [
        _make_group(m, sampling_dir=sampling_dir, reuse=cfg.reuse_sampling) for m in by_key.values()
    ]
    group_of = {i: g.key for g in groups for i in g.trials}
    return SweepPlan(
        trials=tuple(dataclasses.replace(t, group=group_of[t.index]) for t in trials),
        groups={g.key: g for g in groups},
        space=json.loads(json.dumps(cfg.to_dict()["space"])),
        cpus_per_trial=cfg.cpus_per_trial,
        gpus_per_trial=cfg.gpus_per_trial,
        select_frac=cfg.select_frac,
    )


def select_candidates(
    infos: Sequence[CandidateInfo], *, interval: int, unit: str, sample_epochs: int
) -> list[str]:
    """The candidates a sampling run with ``interval`` (and ``sample_epochs``) would have written,
    picked from a finer run of the same trajectory: every snapshot at a multiple of ``interval``
    plus the final one.

    >>> from twa_ray.store.arrow import CandidateInfo as C
    >>> infos = [C(f"c{e}", 10 * e, float(e), "", 0, "r") for e in range(1, 7)]
    >>> select_candidates(infos, interval=2, unit="epoch", sample_epochs=5)
    ['c2', 'c4', 'c5']
    """
    infos = sorted(infos, key=lambda i: i.step)
    if unit == "epoch":
        kept = [
            i
            for i in infos
            if round(i.epoch) <= sample_epochs
            and (round(i.epoch) % interval == 0 or round(i.epoch) == sample_epochs)
        ]
    else:
        kept = [i for i in infos if i.step % interval == 0 or i is infos[-1]]
    return [i.name for i in kept]
