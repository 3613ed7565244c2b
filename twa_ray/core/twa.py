"""Trainable Weight Averaging: learn the averaging coefficients of K candidate solutions.

.. math::
    \\begin{aligned}
    &\\textbf{input}: \\text{subspace } (o, B), \\ \\alpha_0 \\text{ (SWA point)}, \\ \\eta_t \\\\
    &\\textbf{for } t = 0, 1, \\ldots: \\\\
    &\\quad g = \\nabla_\\theta \\ell(\\theta_t; \\text{batch})               &&\\text{(forward + backward)} \\\\
    &\\quad a_{k,l} = \\langle B_{k,l}, g \\rangle                           &&\\text{(project: K·L numbers)} \\\\
    &\\quad \\alpha_{t+1} = \\mathrm{step}(\\alpha_t, a, \\eta_t)          &&\\text{(SGD+momentum or AdamW)} \\\\
    &\\quad \\theta_{t+1} = o + \\textstyle\\sum_{k,l} \\alpha_{t+1}[k,l] B_{k,l} &&\\text{(reconstruct)}
    \\end{aligned}

TWA-t runs this loop on training batches, TWA-v on held-out validation batches: the same loop
with another loader. Paper: Li et al., "Trainable Weight Averaging", arXiv 2205.13104.

A distributed caller passes a :class:`~twa_ray.core.placement.Placement` (this worker's part of
B and its process group) instead of the subspace: :meth:`TWA.coefficient_grad` then returns the
group's mean ``a`` and :meth:`TWA.apply_` rebuilds theta with the placement's collectives.

>>> import torch
>>> from torch import nn
>>> model = nn.Linear(4, 2)
>>> cands = [{n: p + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(3)]
>>> twa = TWA(model, cands, bits=8, lr=0.1)
>>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]
>>> _ = twa.fit(data, epochs=1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Annotated, Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from twa_ray.core.bn import split_batch, update_bn
from twa_ray.core.checks import Range, check_fields, check_loss
from twa_ray.core.layout import Layout, flatten, load_flat_, parse_blocks
from twa_ray.core.loop import BatchSource, CoefficientLoop, LoaderBatches, LoopHooks, total_steps
from twa_ray.core.optim import make_optimizer
from twa_ray.core.placement import Placement, place
from twa_ray.core.quant import ALLOWED_BITS
from twa_ray.core.subspace import CandidateStream, Subspace, build_affine, build_span

__all__ = ["TWA", "Coefficients", "TWAConfig", "build_subspace"]


@dataclass(frozen=True, kw_only=True)
class TWAConfig:
    """Settings of the coefficient phase (subspace, quantization, optimizer, schedule)."""

    subspace: Literal["affine", "span"] = "affine"
    """affine: layer-wise normalized deltas around the mean (journal); span: orthonormal QR basis (ICLR)."""
    blocks: str = "size:16384"
    """Coefficient blocks: 'model' (one per candidate), 'tensor' (per parameter tensor), 'size:N'
    (consecutive tensors merged until a block holds >= N elements). The default keeps large
    tensors layer-wise and pools biases and norm scales, whose own coefficients overfit a small
    held-out split (bench/claims.py: +1.1 points for TWA-v over 'tensor' on MNIST-1D)."""
    bits: int = 4
    """Bits per code of the projection matrix B: 1, 2, 4, 8, or 16/32 (unquantized)."""
    granularity: Literal["row", "block"] = "row"
    """Quantization range per (candidate, block) ('row') or per block ('block')."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """Optimizer over the coefficients."""
    lr: Annotated[float, Range(gt=0, lt=math.inf)] = 0.2
    """Peak learning rate of the coefficients."""
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9
    """SGD momentum (ignored by AdamW)."""
    weight_decay: Annotated[float, Range(ge=0, lt=math.inf)] = 0.0
    """Decay of the coefficients towards the SWA point."""
    epochs: Annotated[float, Range(gt=0, lt=math.inf)] = 3.0
    """TWA epochs, counted in passes over the training data: TWA-v takes as many steps as
    TWA-t, cycling the (smaller) held-out split (fractions allowed)."""
    schedule: Literal["constant", "step", "linear", "cosine"] = "cosine"
    """Learning-rate decay after warm-up."""
    warmup_frac: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Fraction of the steps spent warming up linearly."""
    step_size: Annotated[int, Range(ge=1)] = 100
    """'step' schedule: steps between decays."""
    gamma: Annotated[float, Range(gt=0, le=1)] = 0.1
    """'step' schedule: decay factor."""
    basis_placement: Literal["replicate", "shard", "auto"] = "auto"
    """Where the quantized basis lives in the coefficient group: a full copy per worker
    ('replicate'), split across workers ('shard'), or chosen from its size ('auto')."""
    start: Literal["swa", "best"] = "swa"
    """Where alpha starts: the SWA point, or the best on the hold split of SWA, the last
    candidate and the extra candidates a host passes (the EMA) (:mod:`twa_ray.core.start`).
    'swa' by default: 'best' gained nothing on the selection split (bench/protocol_free.md)."""
    keep_best: bool = False
    """Keep the alpha of the best hold accuracy among the start and every TWA epoch (early
    stopping); off by default for the same reason as ``start``."""
    hold_frac: Annotated[float, Range(ge=0, lt=1)] = 0.5
    """Part of the validation split held out of TWA-v's fit; the start, the kept epoch and the
    saved model are chosen on it (0: none held out; choices then use all of val)."""

    def __post_init__(self) -> None:
        errors = []
        try:
            kind, _ = parse_blocks(self.blocks)
            if self.subspace == "span" and kind != "model":
                errors.append(
                    f"blocks={self.blocks!r}: the span subspace has one block; use 'model'"
                )
        except ValueError as e:
            errors.append(str(e))
        if self.bits not in ALLOWED_BITS:
            errors.append(f"bits={self.bits}: use one of {', '.join(map(str, ALLOWED_BITS))}")
        check_fields(self, "TWA config", errors)  # the choices and bounds declared above

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TWAConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TWA option(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Candidate = torch.Tensor | Mapping[str, torch.Tensor] | nn.Module


class Coefficients(Protocol):
    """What :class:`TWA` needs of its part of the subspace: a
    :class:`~twa_ray.core.placement.Placement`, or a
    :class:`~twa_ray.core.sharded_subspace.ShardedSubspace` under FSDP2."""

    alpha0: torch.Tensor
    points: torch.Tensor | None

    def to(self, device: torch.device | str) -> Coefficients: ...

    def mean_grad(self, g: torch.Tensor) -> torch.Tensor: ...

    def reconstruct(
        self, alpha: torch.Tensor, *, out: torch.Tensor | None = None
    ) -> torch.Tensor: ...


def candidate_stream(candidates: Any, layout: Layout) -> CandidateStream:
    """A re-iterable stream of flat candidates from a store (anything with ``iter_flat()`` and
    ``layout``), a sequence of flat tensors / state dicts / modules, or a zero-argument callable."""
    if hasattr(candidates, "iter_flat"):
        store_layout = getattr(candidates, "layout", None)
        if store_layout is not None:
            layout.check_compatible(store_layout, "the candidate store")
        return candidates.iter_flat
    if callable(candidates):
        return candidates
    if isinstance(candidates, Sequence):
        items = list(candidates)

        def stream() -> Iterator[torch.Tensor]:
            for c in items:
                yield c.detach().float() if isinstance(c, torch.Tensor) else flatten(c, layout)

        return stream
    raise ValueError(
        f"cannot read candidates from a {type(candidates).__name__}; pass a CandidateStore, "
        "a list of state dicts / flat tensors / modules, or a callable returning an iterator"
    )


def build_subspace(candidates: Any, layout: Layout, config: TWAConfig) -> Subspace:
    """The subspace named by ``config`` over ``candidates`` (see :func:`candidate_stream`)."""
    stream = candidate_stream(candidates, layout)
    if config.subspace == "span":
        return build_span(stream, layout, bits=config.bits)
    return build_affine(
        stream,
        layout,
        blocks=layout.blocks(config.blocks),
        bits=config.bits,
        granularity=config.granularity,
    )


class TWA:
    """Learn averaging coefficients of candidate weights for ``model``.

    Args:
        model: the network; its trainable parameters are overwritten with ``theta(alpha)``.
        candidates: a :class:`Placement` (a worker's part of a subspace, see
            :mod:`twa_ray.core.placement`), a :class:`Subspace`, a candidate store, or a sequence
            of state dicts, flat tensors or modules with the model's layout. B is moved to the
            model's device once (no copy when it is there already: TWA objects built on the
            same device-resident subspace or placement share its bytes).
        config: a :class:`TWAConfig`; keyword ``overrides`` replace its fields.
    """

    def __init__(
        self,
        model: nn.Module,
        candidates: Any,
        *,
        config: TWAConfig | None = None,
        loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
        **overrides: Any,
    ) -> None:
        self.config = replace(config or TWAConfig(), **overrides)
        self.model = model
        self.layout = Layout.from_module(model)
        self.loss_fn = loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.placement = self._place(candidates).to(self.device)
        self.alpha = self.placement.alpha0.clone().requires_grad_(False)
        self.step_count = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self._flat = self._bind_flat_params()
        self.load_theta_()

    def _place(self, candidates: Any) -> Coefficients:
        """This worker's part of the subspace over ``candidates`` (see the class docstring)."""
        if isinstance(candidates, Placement):
            placement = candidates
        else:
            subspace = (
                candidates
                if isinstance(candidates, Subspace)
                else build_subspace(candidates, self.layout, self.config)
            )
            placement = place(subspace, "replicate")
        if placement.numel != self.layout.numel:
            raise ValueError(
                f"subspace has dimension {placement.numel}, the model {self.layout.numel}"
            )
        return placement

    # -- weights --------------------------------------------------------------------------
    def _bind_flat_params(self) -> torch.Tensor | None:
        """Make the float32 parameters views of one flat buffer so reconstruct writes in place."""
        if any(p.dtype != torch.float32 for p in self.params):
            return None
        flat = flatten(self.model, self.layout).to(self.device)
        with torch.no_grad():
            for p, a, b, shape in zip(
                self.params, self.layout.offsets, self.layout.offsets[1:], self.layout.shapes
            ):
                p.data = flat[a:b].view(shape)
        return flat

    @property
    def theta(self) -> torch.Tensor:
        """The current weights ``o + sum alpha B`` as a flat (D,) float32 tensor (a collective
        under a 'shard' placement: every worker of the group calls it)."""
        return self.placement.reconstruct(self.alpha)

    @torch.no_grad()
    def load_theta_(self) -> None:
        """Write ``theta(alpha)`` into the model's parameters."""
        if self._flat is not None:
            self.placement.reconstruct(self.alpha, out=self._flat)
        else:
            load_flat_(self.model, self.theta, self.layout)

    # -- optimization ------------------------------------------------------------------------
    def start(self, total_steps: int) -> None:
        """Create the optimizer and schedule for ``total_steps`` coefficient steps."""
        cfg = self.config
        self.optimizer, self.scheduler = make_optimizer(
            self.alpha,
            optimizer=cfg.optimizer,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            total_steps=total_steps,
            schedule=cfg.schedule,
            warmup_steps=int(cfg.warmup_frac * total_steps),
            step_size=cfg.step_size,
            gamma=cfg.gamma,
        )

    def coefficient_grad(self, batch: Any) -> tuple[torch.Tensor, float, int, int]:
        """Forward + backward on ``batch`` at ``theta``; returns ``(a, loss_sum, correct, count)``
        with ``a = B g`` of shape (R, L), averaged over the placement's workers (their batches);
        loss_sum, correct and count are this worker's."""
        self.model.train()
        for p in self.params:
            p.grad = None
        x, y = split_batch(batch, self.device)
        out = self.model(x)
        loss = self.loss_fn(out, y)
        check_loss(loss)
        loss.backward()
        g = self._grad()
        count = int(y.shape[0]) if isinstance(y, torch.Tensor) else int(x.shape[0])
        classify = (
            isinstance(y, torch.Tensor) and not y.is_floating_point() and out.dim() == y.dim() + 1
        )
        correct = int((out.argmax(-1) == y).sum()) if classify else 0
        return self.placement.mean_grad(g), float(loss.detach()) * count, correct, count

    def _grad(self) -> torch.Tensor:
        """The flat float32 gradient of the parameters (zeros where none arrived)."""
        return torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                for p in self.params
            ]
        )

    @torch.no_grad()
    def apply_(self, a: torch.Tensor) -> None:
        """One optimizer step on alpha with gradient ``a`` (R, L), then reconstruct theta."""
        if self.optimizer is None or self.scheduler is None:
            raise RuntimeError("call start(total_steps) (or fit) before apply_")
        self.alpha.grad = a.to(self.alpha)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        self.load_theta_()

    def fit(
        self,
        data: Iterable[Any] | BatchSource,
        *,
        epochs: float | None = None,
        steps: int | None = None,
        steps_per_epoch: int | None = None,
        on_step: Callable[[int, float], None] | None = None,
        hooks: LoopHooks | None = None,
        **options: Any,
    ) -> TWA:
        """Optimize alpha with the :class:`~twa_ray.core.loop.CoefficientLoop` for ``steps``
        more steps (default: ``epochs`` epochs of ``steps_per_epoch`` steps, by default one
        pass over ``data``), cycling ``data`` (train data: TWA-t; held-out data: TWA-v).

        Args:
            data: a re-iterable loader or list of batches, or a
                :class:`~twa_ray.core.loop.BatchSource` (:class:`~twa_ray.core.loop.ShuffledBatches`:
                the seeded, replayable order every twa_ray host uses).
            epochs: default ``config.epochs``.
            on_step: ``on_step(step, loss)`` after every step.
            hooks: more callbacks (:class:`~twa_ray.core.loop.LoopHooks`).
            options: the loop's ``sync_every``, ``labels``, ``progress``.

        The first call creates the optimizer and a schedule over its steps; later calls go on
        with them.
        """
        source: BatchSource = data if hasattr(data, "batches") else LoaderBatches(data)  # type: ignore[assignment]
        per_epoch = steps_per_epoch or source.steps_per_pass
        if steps is None:
            if not per_epoch:
                raise ValueError("data has no length: pass steps= or steps_per_epoch=")
            steps = total_steps(self.config.epochs if epochs is None else epochs, per_epoch)
        loop = CoefficientLoop(
            self,
            source,
            total_steps=self.step_count + steps,
            steps_per_epoch=per_epoch or steps,
            hooks=hooks if on_step is None else replace(hooks or LoopHooks(), on_step=on_step),
            **options,
        )
        if self.optimizer is None:
            self.start(steps)
        loop.run()
        return self

    def update_bn(self, loader: Iterable[Any], **kw: Any) -> int:
        """Re-estimate BatchNorm statistics at the current weights (call after :meth:`fit`)."""
        return update_bn(loader, self.model, device=self.device, **kw)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha.detach().cpu().clone(),
            "step": self.step_count,
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, total_steps: int | None = None) -> None:
        alpha = state["alpha"]
        if tuple(alpha.shape) != tuple(self.alpha.shape):
            raise ValueError(
                f"coefficients of shape {list(alpha.shape)} do not fit this subspace "
                f"{list(self.alpha.shape)}; the checkpoint comes from other candidates"
            )
        with torch.no_grad():
            self.alpha.copy_(alpha)
        self.step_count = int(state["step"])
        if state.get("optimizer") is not None:
            if self.optimizer is None:
                if total_steps is None:
                    raise ValueError("total_steps is needed to restore the optimizer state")
                self.start(total_steps)
            assert self.optimizer is not None and self.scheduler is not None
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        self.load_theta_()
