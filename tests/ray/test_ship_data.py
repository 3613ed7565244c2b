"""The driver's dataset shipped to the workers through the object store (issue 28 item 3):
a worker reads the driver's tensors bit for bit; a dataset outside the rule is loaded by each
worker as before; a run's job carries the reference but never writes it."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from twa_ray.config import DataConfig, SamplingConfig
from twa_ray.data import DataSplits, load_dataset
from twa_ray.ray import group
from twa_ray.ray.group import load_worker_splits, ship_splits
from twa_ray.ray.sampling import SamplingJob

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

DATA = DataConfig(num_samples=1500, seed=3)


def _driver_splits(data: DataConfig = DATA) -> DataSplits:
    return load_dataset(
        data.dataset, val_frac=data.val_frac, seed=data.seed, num_samples=data.num_samples
    )


def _tensors(splits: DataSplits) -> list[torch.Tensor]:
    return [t for ds in (splits.train, splits.val, splits.test) for t in ds.tensors]


def _on_a_worker(data: DataConfig, shipped) -> tuple[list[torch.Tensor], int, tuple[int, ...]]:
    """``load_worker_splits`` in another process (a Ray worker): its tensors, copied back."""
    import ray

    def load(data, box):  # pickled by value: refers to nothing of this test module
        from twa_ray.ray.group import load_worker_splits

        s = load_worker_splits(data, box[0])
        tensors = [t.clone() for ds in (s.train, s.val, s.test) for t in ds.tensors]
        return tensors, s.num_classes, s.input_shape

    # the reference nested in a list, as in a job: not resolved by Ray on the way
    return ray.get(ray.remote(num_cpus=0)(load).remote(data, [shipped]))


def _identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b)
    )


def test_a_worker_reads_the_driver_tensors_bit_for_bit():
    # the driver ships splits of another seed than the worker's DataConfig: the worker gets
    # exactly the shipped ones (it did not load its own)
    shipped_splits = _driver_splits(DataConfig(num_samples=1500, seed=4))
    ref = ship_splits(shipped_splits)
    assert ref is not None
    tensors, classes, shape = _on_a_worker(DATA, ref)
    assert _identical(tensors, _tensors(shipped_splits))
    assert not _identical(tensors, _tensors(_driver_splits()))  # seed 3's val split differs
    assert (classes, shape) == (10, (40,))


def test_without_a_shipped_copy_the_worker_loads_the_same_tensors():
    tensors, _, _ = _on_a_worker(DATA, None)
    assert _identical(tensors, _tensors(_driver_splits()))


class _Items(Dataset):
    """A map-style dataset that is not a TensorDataset (reads or transforms per item)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.zeros(4), 0


def test_only_in_memory_tensor_datasets_within_the_limit_are_shipped(monkeypatch):
    splits = _driver_splits()
    other = DataSplits(_Items(4), _Items(2), _Items(2), num_classes=2, input_shape=(4,))
    assert ship_splits(other) is None
    off_cpu = TensorDataset(torch.zeros(2, 4, device="meta"), torch.zeros(2, device="meta"))
    assert ship_splits(DataSplits(off_cpu, off_cpu, off_cpu, 2, (4,))) is None
    size = sum(t.numel() * t.element_size() for t in _tensors(splits))
    monkeypatch.setattr(group, "SHIP_MAX_BYTES", size - 1)
    assert ship_splits(splits) is None
    monkeypatch.setattr(group, "SHIP_MAX_BYTES", size)
    assert ship_splits(splits) is not None


def test_a_missing_data_root_is_refused_even_with_a_shipped_copy(tmp_path):
    data = DataConfig(dataset="cifar10", data_root=str(tmp_path / "nowhere"))
    splits = DataSplits(
        TensorDataset(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)),
        TensorDataset(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long)),
        TensorDataset(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long)),
        num_classes=2,
        input_shape=(4,),
    )
    with pytest.raises(FileNotFoundError, match="nowhere' does not exist on node"):
        load_worker_splits(data, ship_splits(splits))


def test_a_job_carries_the_reference_and_never_writes_it():
    ref = ship_splits(_driver_splits())
    job = SamplingJob(DATA, SamplingConfig(), "store", "run", data_ref=ref)
    assert "data_ref" not in job.to_dict()  # meta.json of every checkpoint: JSON, no reference
    assert job.to_dict() == SamplingJob(DATA, SamplingConfig(), "store", "run").to_dict()
    assert pickle.loads(pickle.dumps(job)).data_ref == ref
