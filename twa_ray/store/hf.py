"""Hugging Face model folders in and out.

A folder holds ``config.json`` and its weights as ``model.safetensors`` or as shards
``model-0000x-of-0000y.safetensors`` listed in ``model.safetensors.index.json``
(``{"weight_map": {tensor name: shard file}}``). Reading is lazy: :func:`load_folder` returns a
mapping that opens the tensor's shard with ``safetensors.safe_open`` when a tensor is asked for,
so an import holds one tensor at a time (plus the flat candidate) and never reads tensors
outside the layout. Nothing is unpickled and nothing is downloaded.

:func:`build_model` makes the architecture from ``config.json`` (``from_config``: fresh weights,
no download) wrapped as :class:`HFLogits` (``forward(x) -> logits``, the HF model's own parameter
names); :func:`save_folder` writes a model with ``save_pretrained`` (sharded) atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twa_ray.core.atomic import atomic_path

__all__ = ["HFLogits", "build_model", "is_folder", "load_folder", "save_folder"]

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def is_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a Hugging Face model folder (sharded, or one file next to its config)."""
    p = Path(path)
    return p.is_dir() and (
        (p / INDEX).is_file() or ((p / SINGLE).is_file() and (p / CONFIG).is_file())
    )


def _weight_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    if not (folder / INDEX).is_file():
        with safe_open(str(folder / SINGLE), framework="pt") as f:
            return {k: folder / SINGLE for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    try:
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{folder / INDEX} is not a safetensors index ({type(e).__name__}: {e}); re-save the "
            "model with save_pretrained"
        ) from None
    missing = sorted({s for s in weight_map.values() if not (folder / s).is_file()})
    if missing:
        raise ValueError(
            f"{folder / INDEX} names shard(s) {', '.join(missing)} that {folder} does not hold; "
            "copy the missing shard files into the folder or re-save it with save_pretrained"
        )
    return {k: folder / s for k, s in weight_map.items()}


def _file_names(folder: Path) -> dict[str, str]:
    """Model parameter name -> name in the folder's files, for architectures whose files keep an
    older naming (``transformers`` 5 renames on load, e.g. ViT's ``encoder.layer.0.attention.
    attention.query`` -> ``layers.0.attention.q_proj``); empty without config.json or transformers.

    Built on the meta device (no memory): the names ``save_pretrained`` writes for each tensor."""
    try:
        import transformers
        from transformers.modeling_utils import revert_weight_conversion
    except ImportError:
        return {}
    if not (folder / CONFIG).is_file():
        return {}
    with torch.device("meta"):
        model = _from_config(folder, transformers)
    state = model.state_dict(keep_vars=True)
    reverted = revert_weight_conversion(model, dict(state))
    by_id = {id(t): k for k, t in reverted.items()}
    return {
        name: by_id[id(t)] for name, t in state.items() if id(t) in by_id and by_id[id(t)] != name
    }


class _LazyState(Mapping[str, torch.Tensor]):
    """The tensors of a folder under the model's parameter names, each read from its shard when
    asked for."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        files = _weight_map(folder)
        renamed = {old: new for new, old in _file_names(folder).items() if old in files}
        self._files = {renamed.get(k, k): (path, k) for k, path in files.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path, key = self._files[name]
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def load_folder(folder: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    """The tensors of a Hugging Face folder by name, read lazily (see the module docstring)."""
    try:
        return _LazyState(Path(folder))
    except ValueError:
        raise
    except Exception as e:  # SafetensorError, OSError: one error type for the user
        raise ValueError(
            f"{folder} holds no readable safetensors weights ({type(e).__name__}: {e}); re-save the "
            "model with save_pretrained"
        ) from None


class HFLogits(nn.Module):
    """A ``transformers`` model seen as ``forward(x) -> logits``, with the model's own parameter
    names (it shares the model's submodules and parameters instead of nesting it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self.__dict__["hf"] = model  # not a submodule: names stay unprefixed

    def forward(self, x: Any) -> torch.Tensor:
        out = self.hf(**x) if isinstance(x, Mapping) else self.hf(x)
        return out.logits

    def train(self, mode: bool = True) -> HFLogits:
        self.hf.train(mode)
        self.training = mode
        return self


def build_model(folder: str | os.PathLike[str]) -> HFLogits:
    """The architecture of ``folder/config.json`` with fresh weights (``from_config``, no download):
    the class named in ``architectures`` (e.g. ``ViTForImageClassification``), else ``AutoModel``."""
    from twa_ray.extras import require

    try:
        transformers = require("transformers", "hf")
    except ImportError as e:  # a user error on the command line: one line, exit 2
        raise ValueError(f"--model hf:{folder}: {e}") from None
    path = Path(folder)
    if not (path / CONFIG).is_file():
        raise ValueError(
            f"--model hf:{folder}: {path / CONFIG} does not exist; pass a Hugging Face model folder "
            "written by save_pretrained (config.json next to the safetensors weights)"
        )
    return HFLogits(_from_config(path, transformers))


def _from_config(path: Path, transformers: Any) -> nn.Module:
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # ValueError/OSError/KeyError on a bad or unknown config
        raise ValueError(
            f"--model hf:{path}: cannot read {path / CONFIG} ({type(e).__name__}: {e})"
        ) from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


def save_folder(
    model: nn.Module, out: str | os.PathLike[str], *, max_shard_size: str | int = "2GB"
) -> Path:
    """Write ``model`` (an :class:`HFLogits` or a ``transformers`` model) as a Hugging Face
    folder at ``out`` with ``save_pretrained`` (sharded above ``max_shard_size``), atomically:
    written next to ``out`` under a temporary name, then renamed."""
    hf = model.hf if isinstance(model, HFLogits) else model
    out = Path(out)
    with atomic_path(out) as tmp:
        hf.save_pretrained(tmp, max_shard_size=max_shard_size)
    return out
