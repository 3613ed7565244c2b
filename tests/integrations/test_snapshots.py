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
    first = (tmp_path / "s" / "step-000000002.arrow").stat().st_mtime_ns
    with torch.no_grad():
        model.weight.add_(1.0)
    resumed = Snapshots(str(tmp_path / "s"), every_n_steps=2)
    resumed.load_state_dict(snaps.state_dict())
    resumed.take(model, step=2, epoch=0.5)  # a replayed step: not written again
    fresh = Snapshots(str(tmp_path / "s"), every_n_steps=2)
    fresh.take(model, step=2, epoch=0.5)  # no state, but the store has it: kept as it is
    assert (tmp_path / "s" / "step-000000002.arrow").stat().st_mtime_ns == first
    resumed.take(model, step=4, epoch=1.0)
    assert resumed.names == ["step-000000002", "step-000000004"] and fresh.names == [
        "step-000000002"
    ]
    store = CandidateStore(str(tmp_path / "s"))
    assert not torch.equal(store.read("step-000000002"), store.read("step-000000004"))


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
