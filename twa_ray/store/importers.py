"""Import existing checkpoints into a candidate store ("average my fine-tuned checkpoints").

Recognized checkpoints under ``src_dir``:

- files directly in it ending in ``.pt`` / ``.pth`` (read with
  ``torch.load(path, map_location="cpu", weights_only=True)`` only: a file whose unpickling would
  run code is refused) or ``.safetensors`` (``safetensors.torch.load_file``);
- Ray Train checkpoint directories anywhere below it: a directory holding one of
  :data:`CHECKPOINT_FILES` (the first one present in that order is used, the rest of the directory,
  e.g. ``optimizer.pt``, is ignored).

A state dict may be nested under ``"state_dict"``, ``"model_state_dict"``, ``"model"`` or
``"module"`` (Lightning / Ray / DeepSpeed style); a ``"module."`` (DDP), ``"_orig_mod."``
(``torch.compile``) or ``"model."`` (a LightningModule's ``self.model``) prefix shared by all
keys is stripped. With a layout (``--model``), tensors are matched by name, and a prefix that
all of the layout's names share in the checkpoint (``net.``, ``model.backbone.``) is found and
stripped; when nothing matches, the error lists the keys found.

Tied parameters (``head.weight = emb.weight``) are one tensor of the layout; a checkpoint may hold
it under every name (``torch.save(state_dict)``) or one (``safetensors.torch.save_model``).
Half-precision tensors (bfloat16 / float16) are upcast losslessly to the model's dtype; a
conversion that would round (float64 -> float32) is refused.

Candidates are ordered by training progress when every checkpoint carries it (a ``global_step``
or ``step`` key, as Lightning saves; a Hugging Face ``checkpoint-N`` folder; else an ``epoch``
key), otherwise by their paths in natural order (numbers compared as numbers: ``epoch=9`` before
``epoch=10``). The order is the candidates' ``step`` in the store (0, 1, ..., after any already there).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from twa_ray.core.layout import Layout, flatten
from twa_ray.store import hf
from twa_ray.store.store import CandidateStore

__all__ = ["Imported", "find_checkpoints", "import_checkpoints", "load_state_dict", "tied_names"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")  # files directly in src_dir
CHECKPOINT_FILES = ("model.safetensors", "model.pt", "model.pth", "checkpoint.pt")  # in Ray dirs
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")
_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, Lightning (self.model)
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")  # re-estimated by TWA
_STEP_KEYS = ("global_step", "step")  # Lightning, Ray / hand-written checkpoints
_HF_STEP = re.compile(r"checkpoint-(\d+)")  # Hugging Face Trainer folders
_HALF = (torch.float16, torch.bfloat16)


def _candidate_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip("._-")[:200].rstrip(".")
    return name or "checkpoint"


def natural_key(text: str) -> list[str | int]:
    """Sort key comparing the numbers in ``text`` as numbers: ``epoch=9`` < ``epoch=10``."""
    parts = re.split(r"(\d+)", text)
    return [int(p) if i % 2 else p.lower() for i, p in enumerate(parts)]


def find_checkpoints(src_dir: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """``(candidate name, file)`` of every checkpoint under ``src_dir``, in natural order of their
    paths (:func:`natural_key`).

    Names come from file names (``ft_a.pt`` -> ``ft_a``) or from the checkpoint directory's path
    relative to ``src_dir`` (``trial_0/checkpoint_000003`` -> ``trial_0-checkpoint_000003``);
    clashes get a ``-2``, ``-3``... suffix.
    """
    src = Path(src_dir).expanduser()
    if src.is_file():
        if src.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"{src} is not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
        found = [(src.stem, src)]
    elif hf.is_folder(src):  # one Hugging Face model (maybe sharded)
        found = [(src.name, src)]
    elif src.is_dir():
        found = []
        for root, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            here = Path(root)
            if here == src:
                for f in sorted(files):
                    if not f.startswith(".") and Path(f).suffix.lower() in CHECKPOINT_SUFFIXES:
                        found.append((Path(f).stem, here / f))
                continue
            if hf.is_folder(here):
                found.append(("-".join(here.relative_to(src).parts), here))
                dirs[:] = []
                continue
            match = next((f for f in CHECKPOINT_FILES if f in files), None)
            if match is not None:
                found.append(("-".join(here.relative_to(src).parts), here / match))
                dirs[:] = []  # a checkpoint directory is one candidate
    else:
        raise FileNotFoundError(f"checkpoint folder {src} does not exist; check the path")
    found.sort(key=lambda f: natural_key(str(f[1].relative_to(src)) if f[1] != src else f[0]))
    out, seen = [], set()
    for text, path in found:
        base = name = _candidate_name(text)
        k = 1
        while name in seen:
            k += 1
            name = f"{base}-{k}"
        seen.add(name)
        out.append((name, path))
    return out


def _short(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()  # no terminal colour codes
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint at ``path`` (``.pt``/``.pth``/``.safetensors``), on CPU.

    ``.pt`` files are loaded with ``torch.load(weights_only=True)`` only: pickled code is never
    run. Any unreadable file raises ``ValueError`` naming it.
    """
    path = Path(path)
    if path.is_dir():  # a Hugging Face folder: read lazily, tensor by tensor
        return hf.load_folder(path)  # type: ignore[return-value]
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError, ...: one error type for the user
            raise ValueError(
                f"{path} is not a readable safetensors file ({_short(e)}); re-export it with "
                "safetensors.torch.save_file(model.state_dict(), path)"
            ) from None
    else:
        try:
            with warnings.catch_warnings():  # noise on non-default protocols; errors follow anyway
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{path} was refused: it holds objects other than tensors and plain containers, "
                f"and unpickling it could run code ({_short(e)}); only "
                "torch.load(weights_only=True) is used. Re-save it with "
                "torch.save(model.state_dict(), path) or convert it to .safetensors"
            ) from None
        except Exception as e:  # corrupt zip, EOF, bad storage...: one error type for the user
            raise ValueError(
                f"{path} is not a readable PyTorch checkpoint ({_short(e)}); re-save it with "
                "torch.save(model.state_dict(), path)"
            ) from None
    for _ in range(4):  # unwrap {"state_dict": {...}}, {"model": {...}, "optimizer": ...}, ...
        if not isinstance(obj, Mapping):
            break
        key = next((k for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict()"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors; save model.state_dict()")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
    return tensors


@dataclass(frozen=True)
class _Progress:
    """How far training was when a checkpoint was saved (``None``: not recorded)."""

    step: int | None = None
    epoch: float | None = None


def _number(v: object) -> float | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and v == v:
        return v
    return None


def _progress(obj: object, path: Path) -> _Progress:
    """The step / epoch a checkpoint records: a ``global_step`` / ``step`` / ``epoch`` key at its
    top level, or a Hugging Face ``checkpoint-N`` folder in its path."""
    top = obj if isinstance(obj, Mapping) else {}
    step = next((int(n) for k in _STEP_KEYS if (n := _number(top.get(k))) is not None), None)
    if step is None:
        hf = [m for part in path.parts[:-1] if (m := _HF_STEP.fullmatch(part))]
        step = int(hf[-1].group(1)) if hf else None
    epoch = _number(top.get("epoch"))
    return _Progress(step, None if epoch is None else float(epoch))


def _peek_progress(path: Path) -> _Progress:
    """The progress a checkpoint records, without reading its tensors (``.pt`` files are
    memory-mapped by ``torch.load(mmap=True, weights_only=True)``; ``.safetensors`` hold none)."""
    obj: object = None
    if path.suffix.lower() != ".safetensors":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # legacy (non-zip) format or unreadable: load_state_dict says which
            obj = None
    return _progress(obj, path)


def tied_names(module: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """The other names of each tied parameter (``head.weight = emb.weight``:
    ``{"emb.weight": ("head.weight",)}``), keyed by the name ``named_parameters()`` gives it."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n[0]: tuple(n[1:]) for n in names.values() if len(n) > 1}


def _storage_key(t: torch.Tensor) -> tuple[object, ...]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def infer_layout(state: Mapping[str, torch.Tensor], *, where: str = "checkpoint") -> Layout:
    """Layout guessed from a state dict: its floating-point tensors, minus BatchNorm statistics
    and second names of tied tensors; half-precision tensors count as float32.

    Frozen parameters and float buffers other than BN statistics are included, so pass the
    model's own ``Layout.from_module(model)`` when it is at hand.
    """
    kept: dict[str, torch.Tensor] = {}
    seen = set()
    for k, v in state.items():
        if not v.is_floating_point() or v.layout != torch.strided or k.endswith(_BUFFER_SUFFIXES):
            continue
        key = _storage_key(v)
        if v.numel() and key in seen:
            continue  # a tied parameter saved under a second name: one tensor of the layout
        seen.add(key)
        kept[k] = v.to(torch.float32) if v.dtype in _HALF else v  # bf16 / fp16: exact in float32
    if not kept:
        raise ValueError(
            f"{where} has no floating-point parameter tensors; save model.state_dict()"
        )
    return Layout.from_tensors(kept)


def _prefix(state: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> str:
    """The prefix under which ``state`` holds every one of ``names`` ('' when they are there
    as they are, or when no prefix fits)."""
    if not names or names[0] in state:
        return ""
    first = names[0]
    for key in state:
        if key.endswith("." + first):
            p = key[: -len(first)]
            if all(p + n in state for n in names):
                return p
    return ""


def _select(
    state: Mapping[str, torch.Tensor],
    layout: Layout,
    path: Path,
    aliases: Mapping[str, tuple[str, ...]],
    upcast: dict[str, int],
) -> dict[str, torch.Tensor]:
    """The layout's tensors of ``state`` (by name or a tied name, under a shared prefix if need
    be), checked for presence and shape; half precision upcast to the layout's dtype (counted
    in ``upcast``: source dtype -> tensors)."""
    fix = (
        "every checkpoint must come from the --model architecture; pass the --model it was "
        "saved from, or remove this file"
    )
    p = _prefix(state, layout.names)
    out = {}
    for name, shape, dtype in zip(layout.names, layout.shapes, layout.dtypes):
        t = next((state[p + n] for n in (name, *aliases.get(name, ())) if p + n in state), None)
        if t is None:
            keys = sorted(state)
            shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
            raise ValueError(
                f"{path}: tensor {name!r} of the model is missing; the checkpoint holds {len(keys)} "
                f"tensors ({shown}); {fix}"
            )
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}; {fix}"
            )
        if t.layout != torch.strided:
            raise ValueError(f"{path}: tensor {name!r} is {t.layout}, expected a dense tensor")
        out[name] = _cast(t, getattr(torch, dtype), name, path, upcast, fix)
    return out


def _cast(
    t: torch.Tensor, want: torch.dtype, name: str, path: Path, upcast: dict[str, int], fix: str
) -> torch.Tensor:
    """``t`` in dtype ``want`` when that is exact (bfloat16 / float16 -> float32 / float64)."""
    if t.dtype == want:
        return t
    got, exp = (str(d).removeprefix("torch.") for d in (t.dtype, want))
    if not (t.is_floating_point() and want.is_floating_point):
        raise ValueError(f"{path}: tensor {name!r} has dtype {got}, expected {exp}; {fix}")
    if torch.promote_types(t.dtype, want) != want:
        raise ValueError(
            f"{path}: tensor {name!r} has dtype {got}, expected {exp}: converting it would round "
            f"its values (only exact upcasts such as bfloat16 -> float32 are done); save the "
            f"checkpoint in {exp} (e.g. model.float().state_dict())"
        )
    upcast[got] = upcast.get(got, 0) + 1
    return t.to(want)


@dataclass(frozen=True)
class Imported:
    """What :func:`import_checkpoints` did.

    Attributes:
        names: the new candidates, in training order (their ``step`` in the store is 0, 1, ...).
        order: what fixed the order: ``"training step"``, ``"epoch"`` or ``"file name"``.
        progress: the recorded step (or epoch) of each candidate when ``order`` is one of those.
        upcast: tensors upcast to the model's dtype, by their dtype in the checkpoints.
    """

    names: list[str]
    order: str
    progress: list[float] = field(default_factory=list)
    upcast: dict[str, int] = field(default_factory=dict)

    def summary(self, out: str) -> str:
        """One line: how many, where, in which order, what was converted."""
        shown = self.names if len(self.names) <= 6 else [*self.names[:3], "...", *self.names[-2:]]
        text = f"imported {len(self.names)} candidates into {out}, ordered by {self.order}"
        if self.progress:
            text += f" ({self.progress[0]:g} .. {self.progress[-1]:g})"
        text += f": {', '.join(shown)}"
        if self.upcast:
            dtypes = ", ".join(f"{n} {d}" for d, n in sorted(self.upcast.items()))
            text += f"; upcast losslessly to the model's dtype: {dtypes} tensors"
        return text


def _order(progress: list[_Progress]) -> tuple[list[int], str, list[float]]:
    """Indices of the checkpoints in training order, what decided it and the progress values:
    the step when every checkpoint records one, else the epoch, else the (natural) path order."""
    for order, values in (
        ("training step", [p.step for p in progress]),
        ("epoch", [p.epoch for p in progress]),
    ):
        if all(v is not None for v in values):
            idx = sorted(
                range(len(progress)), key=lambda i: values[i]
            )  # stable: ties keep paths' order
            return idx, order, [float(values[i]) for i in idx]  # type: ignore[arg-type]
    return list(range(len(progress))), "file name", []


def import_checkpoints(
    src_dir: str | os.PathLike[str],
    out_uri: str,
    *,
    layout: Layout | None = None,
    aliases: Mapping[str, tuple[str, ...]] | None = None,
) -> Imported:
    """Import every checkpoint under ``src_dir`` into the store at ``out_uri`` (created if needed).

    All-or-nothing: every checkpoint is loaded, checked against the layout and for NaN/Inf, and
    written to a hidden temporary file first; only when all pass are they renamed into place.
    Candidates are named after their files (see :func:`find_checkpoints`), take ``step`` = their
    index in training order (see the module doc; after the candidates already in the store),
    ``epoch`` = the recorded epoch (else 0) and ``source`` = the file path.

    Args:
        src_dir: a folder of ``.pt``/``.pth``/``.safetensors`` files and/or Ray Train checkpoint
            directories (or one checkpoint file).
        out_uri: the candidate store (local path or ``pyarrow.fs`` URI).
        layout: the parameters to import. Pass the model's ``Layout.from_module(model)`` to be
            exact; by default it is inferred from the first checkpoint's floating-point tensors,
            minus BatchNorm running statistics, which also picks up frozen parameters and other
            float buffers.
        aliases: other names of tied parameters (:func:`tied_names` of the model), for
            checkpoints that hold a tied tensor under one of those only.

    >>> import_checkpoints("finetuned/", "/tmp/soup", layout=Layout.from_module(model)).names  # doctest: +SKIP
    ['ft_lr1e-4', 'ft_lr3e-4', 'ft_lr1e-3']
    """
    found = find_checkpoints(src_dir)
    if not found:
        raise ValueError(
            f"no checkpoints in {src_dir}: expected {', '.join(CHECKPOINT_SUFFIXES)} files or Ray "
            f"Train checkpoint directories holding one of {', '.join(CHECKPOINT_FILES)}"
        )
    try:
        store = CandidateStore(out_uri)
        created = False
    except FileNotFoundError:
        store, created = CandidateStore(out_uri, create=True), True
    clashes = [name for name, _ in found if name in store]
    if clashes:
        raise FileExistsError(
            f"store {out_uri!r} already holds candidates named {clashes[:5]}; import into a new "
            "store or rename the checkpoints"
        )
    progress = [_peek_progress(path) for _, path in found]
    idx, order, values = _order(progress)
    first = 1 + max((store.info(n).step for n in store.names()), default=-1)  # after those there
    names: list[str] = []
    upcast: dict[str, int] = {}
    with store.write_together(drop_if_empty=created) as write:  # a failed import leaves no trace
        for step, i in enumerate(idx):
            name, path = found[i]
            state = load_state_dict(path)
            if layout is None:
                layout = infer_layout(state, where=str(path))
            flat = flatten(_select(state, layout, path, aliases or {}, upcast), layout)
            del state
            names.append(
                write(
                    flat,
                    layout,
                    step=first + step,
                    epoch=progress[i].epoch or 0.0,
                    source=str(path),
                    name=name,
                )
            )
    return Imported(names, order, values, upcast)
