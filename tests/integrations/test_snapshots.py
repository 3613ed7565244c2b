"""What the callbacks store: trainable parameters once (tied weights once, frozen ones left
out), each global step once, and a state that resumes."""

import pytest
import torch

from twa_ray.integrations._common import Snapshots
from twa_ray.store.store import CandidateStore


def test_steps_are_written_once_and_the_state_resumes(tmp_path):
    model = torch.nn.Linear(3, 2)
    snaps = Snapshots(str(tmp_path / "s"), every_n_steps=2)
    assert [snaps.due(step=s) for s in range(5)] == [False, False, True, False, True]
    snaps.take(model, step=2, epoch=0.5)
    first = (tmp_path / "s" / "step00000002.arrow").stat().st_mtime_ns
    with torch.no_grad():
        model.weight.add_(1.0)
    resumed = Snapshots(str(tmp_path / "s"), every_n_steps=2)
    resumed.load_state_dict(snaps.state_dict())
    resumed.take(model, step=2, epoch=0.5)  # a replayed step: not written again
    fresh = Snapshots(str(tmp_path / "s"), every_n_steps=2)
    fresh.take(model, step=2, epoch=0.5)  # no state, but the store has it: kept as it is
    assert (tmp_path / "s" / "step00000002.arrow").stat().st_mtime_ns == first
    resumed.take(model, step=4, epoch=1.0)
    assert resumed.names == ["step00000002", "step00000004"] and fresh.names == ["step00000002"]
    store = CandidateStore(str(tmp_path / "s"))
    assert not torch.equal(store.read("step00000002"), store.read("step00000004"))


def test_interval_is_checked():
    with pytest.raises(ValueError, match="exactly one"):
        Snapshots("x", every_n_steps=1, every_n_epochs=1)
    with pytest.raises(ValueError, match="int >= 1"):
        Snapshots("x", every_n_epochs=0)


def test_tied_weights_once_frozen_left_out(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=8,
    )
    model = transformers.BertForMaskedLM(config)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)
    Snapshots(str(tmp_path / "s"), every_n_epochs=1).take(model, step=1, epoch=1.0)
    names = CandidateStore(str(tmp_path / "s")).layout.names
    assert "bert.embeddings.word_embeddings.weight" in names
    assert "cls.predictions.decoder.weight" not in names  # tied: stored once
    assert "bert.embeddings.position_embeddings.weight" not in names  # frozen: not in the subspace


@pytest.mark.parametrize("old", ["step-000000002", "run7-step-000000002"])
def test_a_store_written_under_an_old_name_stays_readable(tmp_path, old):
    """A callback state from before the one naming scheme (``step-{:09d}``, or the store's
    ``{run_id}-step-{:09d}``): its candidates are read, a replayed step is not taken twice."""
    from twa_ray.core.layout import Layout
    from twa_ray.store.snapshots import candidate_step

    model = torch.nn.Linear(3, 2)
    uri = str(tmp_path / "s")
    CandidateStore(uri, create=True).write(
        dict(model.named_parameters()), Layout.from_module(model), step=2, name=old
    )
    assert candidate_step(old) == 2 and candidate_step("step00000002") == 2
    assert candidate_step("ft0") is None
    snaps = Snapshots(uri, every_n_steps=2)
    snaps.load_state_dict({"store": uri, "names": [old]})
    with torch.no_grad():
        model.weight.add_(1.0)
    snaps.take(model, step=2, epoch=0.5)  # replayed: the old name stands for it
    snaps.take(model, step=4, epoch=1.0)
    assert snaps.names == [old, "step00000004"]
    store = CandidateStore(uri)
    assert store.names() == sorted([old, "step00000004"])
    assert not torch.equal(store.read(old), store.read("step00000004"))
