"""Datasets: MNIST-1D generation and splits, CIFAR official formats (and the safe unpickler),
ImageFolder, user dataset functions, import paths."""

from __future__ import annotations

import os
import pickle
import random
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import one_thread  # noqa: F401  (autouse: one torch thread)
from torch.utils.data import DataLoader, Dataset, TensorDataset

from twa_ray.data import DATASETS, DataSplits, held_out_split, load_dataset
from twa_ray.data import mnist1d as mnist1d_mod
from twa_ray.data.cifar import CIFAR_MEAN_STD, RestrictedUnpickler, restricted_pickle_load
from twa_ray.importpath import ImportPathError, load_callable

# --------------------------------------------------------------------------- MNIST-1D


def _t(ds: Dataset[Any]) -> tuple[torch.Tensor, ...]:
    assert isinstance(ds, TensorDataset)
    return ds.tensors


def _rows(ds: Dataset[Any]) -> set[bytes]:
    return {r.numpy().tobytes() for r in _t(ds)[0]}


def test_mnist1d_default_sizes_and_types(mnist1d_cache: Path) -> None:
    s = load_dataset("mnist1d", root=mnist1d_cache)
    assert isinstance(s, DataSplits)
    assert s.num_classes == 10 and s.input_shape == (40,)
    sizes = s.sizes()
    assert sizes["train"] + sizes["val"] == 10_000  # the package default: 10k train / 2.5k test
    assert sizes["val"] == 1_000 and sizes["test"] >= 2_500
    x, y = s.train[0]
    assert x.dtype == torch.float32 and x.shape == (40,)
    assert y.dtype == torch.int64 and y.dim() == 0
    for ds in (s.train, s.val, s.test):
        assert isinstance(ds, TensorDataset)
        assert ds.tensors[1].dtype == torch.int64
        assert set(ds.tensors[1].unique().tolist()) == set(range(10))
    # the package standardizes the whole set: roughly zero mean, unit std
    assert abs(float(_t(s.train)[0].mean())) < 0.1
    assert 0.8 < float(_t(s.train)[0].std()) < 1.2


def test_mnist1d_splits_disjoint(mnist1d_cache: Path) -> None:
    s = load_dataset("mnist1d", root=mnist1d_cache, val_frac=0.2, seed=3)
    train, val, test = _rows(s.train), _rows(s.val), _rows(s.test)
    sizes = s.sizes()
    assert len(train) == sizes["train"] and len(val) == sizes["val"]  # no duplicate rows
    assert not train & val and not train & test and not val & test
    assert len(val) == 2_000


def test_mnist1d_deterministic_by_seed(tmp_path: Path) -> None:
    random.seed(7)
    np.random.seed(7)
    torch_state = torch.get_rng_state()
    a = load_dataset("mnist1d", root=tmp_path, num_samples=500, seed=0)
    # the package reseeds numpy/random globally: we restore them; torch's RNG is untouched
    after = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    assert after == (random.random(), np.random.rand())
    assert torch.equal(torch.get_rng_state(), torch_state)
    b = load_dataset("mnist1d", root=tmp_path, num_samples=500, seed=0)
    c = load_dataset("mnist1d", root=tmp_path, num_samples=500, seed=1)
    assert a.sizes() == {"train": 360, "val": 40, "test": 100}
    for split in ("train", "val", "test"):
        for t_a, t_b in zip(_t(getattr(a, split)), _t(getattr(b, split))):
            assert torch.equal(t_a, t_b)
    assert not torch.equal(_t(a.val)[0], _t(c.val)[0])  # other seed, other split
    assert torch.equal(_t(a.test)[0], _t(c.test)[0])  # same data, same test
    assert _rows(a.train) | _rows(a.val) == _rows(c.train) | _rows(c.val)


def test_mnist1d_cache_is_used_and_pickle_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = load_dataset("mnist1d", root=tmp_path, num_samples=200)
    files = list((tmp_path / "mnist1d").glob("*.npz"))
    assert len(files) == 1 and not list((tmp_path / "mnist1d").glob("*.tmp"))
    with np.load(files[0], allow_pickle=False) as z:
        assert sorted(z.files) == ["x", "x_test", "y", "y_test"]

    def no_generation(n: int) -> None:
        raise AssertionError("generated again despite the cache")

    monkeypatch.setattr(mnist1d_mod, "_make", no_generation)
    b = load_dataset("mnist1d", root=tmp_path, num_samples=200)
    assert torch.equal(_t(a.train)[0], _t(b.train)[0])
    monkeypatch.undo()

    files[0].write_bytes(b"not a zip file")  # a corrupt cache is regenerated, not fatal
    c = load_dataset("mnist1d", root=tmp_path, num_samples=200)
    assert torch.equal(_t(a.test)[0], _t(c.test)[0])


def test_held_out_split() -> None:
    tr, va = held_out_split(103, 0.1, seed=5)
    assert len(va) == 10 and len(tr) == 93
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(103))
    assert torch.equal(va, held_out_split(103, 0.1, seed=5)[1])
    assert held_out_split(10, 0.0, seed=0)[1].numel() == 0
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match="val_frac"):
            held_out_split(10, bad, seed=0)


# --------------------------------------------------------------------------- CIFAR files

_CIFAR_N = {"cifar10": (3, 4), "cifar100": (12, 5)}  # (records per train file, test records)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_cifar(root: Path, name: str, fmt: str, protocol: int = 2) -> dict[str, np.ndarray]:
    """Tiny CIFAR files in the official layout; returns the images/labels written."""
    rng = np.random.default_rng(0)
    per_file, n_test = _CIFAR_N[name]
    num_classes = 10 if name == "cifar10" else 100
    train_files = (
        ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])
        if name == "cifar10"
        else (["train"], ["test"])
    )
    xs: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    ys: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    folder = {
        ("cifar10", "bin"): "cifar-10-batches-bin",
        ("cifar10", "py"): "cifar-10-batches-py",
        ("cifar100", "bin"): "cifar-100-binary",
        ("cifar100", "py"): "cifar-100-python",
    }[(name, fmt)]
    d = root / folder
    d.mkdir(parents=True)
    for split, files, n in (("train", train_files[0], per_file), ("test", train_files[1], n_test)):
        for f in files:
            x = _images(rng, n)
            y = rng.integers(0, num_classes, size=n)
            coarse = rng.integers(0, 20, size=n)
            xs[split].append(x)
            ys[split].append(y)
            if fmt == "bin":
                if name == "cifar10":
                    rec = np.concatenate([y[:, None].astype(np.uint8), x], axis=1)
                else:
                    lab = np.stack([coarse, y], axis=1).astype(np.uint8)
                    rec = np.concatenate([lab, x], axis=1)
                rec.tofile(d / f"{f}.bin")
            else:  # the dict of the official python-version files
                obj: dict[bytes, object] = {
                    b"batch_label": f"{split} batch".encode(),
                    b"data": x,
                    b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                }
                if name == "cifar10":
                    obj[b"labels"] = [int(v) for v in y]
                else:
                    obj[b"fine_labels"] = [int(v) for v in y]
                    obj[b"coarse_labels"] = [int(v) for v in coarse]
                with open(d / f, "wb") as fh:
                    pickle.dump(obj, fh, protocol=protocol)
    return {
        "x": np.concatenate(xs["train"]).reshape(-1, 3, 32, 32),
        "y": np.concatenate(ys["train"]),
        "x_test": np.concatenate(xs["test"]).reshape(-1, 3, 32, 32),
        "y_test": np.concatenate(ys["test"]),
    }


def _normalized(name: str, img: np.ndarray) -> torch.Tensor:
    mean, std = CIFAR_MEAN_STD[name]
    x = torch.from_numpy(img).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@pytest.mark.parametrize(
    "name,fmt,protocol",
    [
        ("cifar10", "bin", 0),
        ("cifar100", "bin", 0),
        ("cifar10", "py", 2),
        ("cifar100", "py", 2),
        ("cifar10", "py", 5),
    ],
)
def test_cifar_official_formats(tmp_path: Path, name: str, fmt: str, protocol: int) -> None:
    ref = _write_cifar(tmp_path, name, fmt, protocol)
    n = len(ref["y"])
    s = load_dataset(name, root=tmp_path, val_frac=0.2, seed=0, augment=False)
    assert s.num_classes == (10 if name == "cifar10" else 100)
    assert s.input_shape == (3, 32, 32)
    assert s.sizes() == {
        "train": n - round(0.2 * n),
        "val": round(0.2 * n),
        "test": len(ref["y_test"]),
    }
    # every train/val item is one of the written records, each exactly once, labels = fine labels
    seen = []
    for ds in (s.train, s.val):
        for i in range(len(ds)):  # type: ignore[arg-type]
            x, y = ds[i]
            assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y.dtype == torch.int64
            j = ds.indices[i]  # type: ignore[attr-defined]
            assert torch.allclose(x, _normalized(name, ref["x"][j]))
            assert int(y) == ref["y"][j]
            seen.append(int(j))
    assert sorted(seen) == list(range(n))
    x, y = s.test[len(ref["y_test"]) - 1]
    assert torch.allclose(x, _normalized(name, ref["x_test"][-1])) and int(y) == ref["y_test"][-1]
    # root may also be the extracted folder itself
    inner = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert load_dataset(name, root=inner, val_frac=0.2).sizes() == s.sizes()


def test_cifar_train_augmentation(tmp_path: Path) -> None:
    _write_cifar(tmp_path, "cifar10", "bin")
    s = load_dataset("cifar10", root=tmp_path, val_frac=0.2)
    torch.manual_seed(0)
    views = torch.stack([s.train[0][0] for _ in range(20)])
    assert views.shape == (20, 3, 32, 32)
    assert len({v.numpy().tobytes() for v in views}) > 1  # random crops / flips differ
    assert torch.equal(s.val[0][0], s.val[0][0]) and torch.equal(s.test[0][0], s.test[0][0])


class _Evil:
    """Unpickling this would create ``marker`` (via builtins.open or os.system)."""

    def __init__(self, marker: Path, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self) -> tuple[Any, ...]:
        if self.how == "open":
            return (open, (str(self.marker), "w"))
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["open", "system"])
def test_cifar_python_pickle_refuses_code(tmp_path: Path, how: str) -> None:
    _write_cifar(tmp_path, "cifar10", "py")
    marker = tmp_path / "pwned"
    bad = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil(marker, how)]}
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as fh:
        pickle.dump(bad, fh, protocol=2)
    with pytest.raises(ValueError, match="refusing to load global"):  # one clean error for the CLI
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()


def test_restricted_unpickler_allows_only_numpy_arrays(tmp_path: Path) -> None:
    p = tmp_path / "ok.pkl"
    arr = np.arange(12, dtype=np.int16).reshape(3, 4)
    for protocol in (2, 3, 4, 5):
        p.write_bytes(pickle.dumps({b"a": arr, b"b": [1, 2.5, b"x", "s"]}, protocol=protocol))
        out = restricted_pickle_load(p)
        assert np.array_equal(out[b"a"], arr) and out[b"b"] == [1, 2.5, b"x", "s"]
    for bad in (np.array([object()], dtype=object), np.zeros(2, dtype=[("a", "O")])):
        p.write_bytes(pickle.dumps(bad, protocol=2))
        with pytest.raises(pickle.UnpicklingError, match="dtype"):
            restricted_pickle_load(p)
    assert issubclass(RestrictedUnpickler, pickle.Unpickler)


def test_cifar_missing_root_names_files_and_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("cifar100", root=tmp_path / "nowhere")
    msg = str(e.value)
    assert "nowhere" in msg and "cifar-100-binary" in msg and "train.bin" in msg
    assert "cifar-100-python" in msg and "https://www.cs.toronto.edu/~kriz/" in msg
    with pytest.raises(FileNotFoundError, match="data_batch_1.bin"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_truncated_binary(tmp_path: Path) -> None:
    _write_cifar(tmp_path, "cifar10", "bin")
    f = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ValueError, match="3073-byte"):
        load_dataset("cifar10", root=tmp_path)


# --------------------------------------------------------------------------- ImageFolder


def _write_images(d: Path, classes: dict[str, int], seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, n in classes.items():
        (d / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / c / f"{i}.png")


def test_imagefolder_train_val(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"cat": 5, "dog": 5}, 0)
    _write_images(tmp_path / "val", {"cat": 2, "dog": 1}, 1)
    s = load_dataset("imagefolder", root=tmp_path, image_size=16, val_frac=0.2, seed=0)
    assert s.num_classes == 2 and s.input_shape == (3, 16, 16)
    assert s.sizes() == {"train": 8, "val": 2, "test": 3}  # val/ is the test split here
    for ds in (s.train, s.val, s.test):
        x, y = ds[0]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and 0 <= int(y) < 2
    assert sorted(int(s.test[i][1]) for i in range(3)) == [0, 0, 1]
    assert not set(s.train.indices) & set(s.val.indices)  # type: ignore[attr-defined]
    batch = next(iter(DataLoader(s.train, batch_size=4)))
    assert batch[0].shape == (4, 3, 16, 16) and batch[1].dtype == torch.int64


def test_imagefolder_train_val_test_and_class_mapping(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 2, "b": 2, "c": 2}, 0)
    _write_images(tmp_path / "val", {"a": 1, "c": 1}, 1)  # a class may be missing ...
    _write_images(tmp_path / "test", {"b": 1, "c": 2}, 2)
    s = load_dataset("imagefolder", root=tmp_path, image_size=8)
    assert s.num_classes == 3 and s.sizes() == {"train": 6, "val": 2, "test": 3}
    assert sorted(int(s.val[i][1]) for i in range(2)) == [0, 2]  # ... indices follow train
    assert sorted(int(s.test[i][1]) for i in range(3)) == [1, 2, 2]
    _write_images(tmp_path / "val", {"zebra": 1}, 4)  # ... but an unknown class is an error
    with pytest.raises(ValueError, match="zebra"):
        load_dataset("imagefolder", root=tmp_path, image_size=8)


def test_imagefolder_missing(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="val"):
        load_dataset("imagefolder", root=tmp_path)


# --------------------------------------------------------------------------- user functions


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    code = """
        import torch
        from torch.utils.data import DataLoader, Dataset, TensorDataset
        from twa_ray.data import DataSplits

        def _ds(n, seed):
            g = torch.Generator().manual_seed(seed)
            return TensorDataset(torch.randn(n, 3, 5, generator=g), torch.randint(0, 4, (n,), generator=g))

        def as_splits():
            return DataSplits(_ds(8, 0), _ds(2, 1), _ds(3, 2), num_classes=4, input_shape=(3, 5))

        def as_tuple(seed=0):
            return _ds(8, seed), _ds(2, 1), _ds(3, 2)

        def as_tuple4(**kwargs):
            assert set(kwargs) == {"root", "val_frac", "seed", "num_samples"}
            return _ds(8, 0), _ds(2, 1), _ds(3, 2), 7

        def as_dict_loaders(root, num_samples):
            return {"train": DataLoader(_ds(num_samples or 10, 0), batch_size=4),
                    "test": DataLoader(_ds(3, 2))}

        def bad_return():
            return 42

        def float_labels():
            return TensorDataset(torch.randn(4, 2), torch.rand(4)), None, TensorDataset(torch.randn(2, 2), torch.rand(2))

        NOT_CALLABLE = 3
    """
    (tmp_path / "my_user_data.py").write_text(textwrap.dedent(code))
    (tmp_path / "my_user_broken.py").write_text("import twa_ray_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_user_data"
    sys.modules.pop("my_user_data", None)
    sys.modules.pop("my_user_broken", None)


def test_user_dataset_forms(user_module: str) -> None:
    s = load_dataset(f"{user_module}:as_splits")
    assert s.num_classes == 4 and s.input_shape == (3, 5)

    s = load_dataset(f"{user_module}:as_tuple", seed=1)  # seed is passed on
    assert s.input_shape == (3, 5) and s.sizes() == {"train": 8, "val": 2, "test": 3}
    assert s.num_classes == int(_t(s.train)[1].max()) + 1  # inferred from the labels

    assert load_dataset(f"{user_module}:as_tuple4").num_classes == 7

    s = load_dataset(f"{user_module}:as_dict_loaders", num_samples=20, val_frac=0.25, seed=0)
    assert s.sizes() == {"train": 15, "val": 5, "test": 3}  # val held out of train
    assert not set(s.train.indices) & set(s.val.indices)  # type: ignore[attr-defined]


def test_user_dataset_errors(user_module: str) -> None:
    with pytest.raises(ValueError, match="expected DataSplits"):
        load_dataset(f"{user_module}:bad_return")
    with pytest.raises(ValueError, match="integer class indices"):
        load_dataset(f"{user_module}:float_labels")
    with pytest.raises(ImportPathError, match="not a callable"):
        load_dataset(f"{user_module}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'") as e:
        load_dataset("cifar11")
    assert all(name in str(e.value) for name in DATASETS)


def test_load_callable_errors(user_module: str) -> None:
    assert load_callable("math:sqrt")(9.0) == 3.0
    assert load_callable("os.path:join")("a", "b") == os.path.join("a", "b")
    with pytest.raises(ImportPathError, match="no module named 'no_such_pkg_xyz'"):
        load_callable("no_such_pkg_xyz.sub:f")
    with pytest.raises(ImportPathError, match="has no attribute 'nope'"):
        load_callable(f"{user_module}:nope")
    with pytest.raises(ImportPathError, match="has no attribute 'nope'"):
        load_callable("os:path.nope")
    with pytest.raises(ImportPathError, match="not a callable"):
        load_callable(f"{user_module}:NOT_CALLABLE")
    for bad in ("nocolon", "a:b:c", ":f", "mod:"):
        with pytest.raises(ImportPathError, match="package.module:function"):
            load_callable(bad)
    # a missing dependency *inside* the user's code is not disguised as a bad path
    with pytest.raises(ModuleNotFoundError, match="twa_ray_no_such_dependency") as e:
        load_callable("my_user_broken:f")
    assert not isinstance(e.value, ImportPathError)
    assert issubclass(ImportPathError, ValueError)
