"""The callbacks refuse sharded training in one line (no GPU needed): they snapshot and learn on
full parameters (the core's ShardedTWA learns on shards)."""

import pytest
from torch import nn


def test_lightning_refuses_a_sharding_strategy(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.strategies import ModelParallelStrategy

    from twa_ray.integrations.lightning import TWACallback

    cb = TWACallback(str(tmp_path / "cands"))
    ddp = pl.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    cb.setup(ddp, None, "fit")  # data-parallel: accepted
    trainer = pl.Trainer(
        strategy=ModelParallelStrategy(), accelerator="cpu", devices=1, logger=False
    )
    with pytest.raises(
        ValueError,
        match="^TWACallback does not support sharded models yet "
        r"\(strategy ModelParallelStrategy\).*ddp",
    ):
        cb.setup(trainer, None, "fit")


def test_hf_refuses_fsdp(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")

    from twa_ray.integrations.hf import TWACallback

    def begin(**kw):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kw)
        TWACallback().on_train_begin(
            args, transformers.TrainerState(), transformers.TrainerControl(), model=nn.Linear(2, 2)
        )

    begin()  # not sharded: accepted
    with pytest.raises(ValueError, match=r"sharded models yet \(FSDP \(accelerate\)\)"):
        begin(fsdp=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --config fsdp.yaml
    with pytest.raises(ValueError, match="FSDP"):
        begin()
