"""The Hugging Face Trainer callback: examples/hf_trainer.py (a 2-layer BERT from a config)."""

import pytest

pytest.importorskip("transformers")


@pytest.mark.slow
def test_callback_twa_beats_the_shortened_run(hf_single):
    from transformers import BertForSequenceClassification

    out, result = hf_single
    assert result["twa/num_candidates"] == 4  # stopped at 4 of 8 epochs, one snapshot per epoch
    assert result["twa/twa_loss"] < result["twa/final_loss"]
    assert result["twa/twa_acc"] > result["twa/final_acc"]
    assert "twa/swa_acc" in result  # SWA of the same candidates, next to it
    # held out (TWA-v fits on the eval dataset): TWA beats the final weights and SWA on the test split
    assert result["test/twa_acc"] > result["test/final_acc"]
    assert result["test/twa_acc"] > result["test/swa_acc"]
    model = BertForSequenceClassification.from_pretrained(out / "twa")  # save_pretrained'd
    names = {n for n, _ in model.named_parameters()}
    assert "bert.embeddings.word_embeddings.weight" in names
