# python examples/hf_trainer.py --out /tmp/twa_hf
# python examples/hf_trainer.py --out /tmp/twa_hf_ray --num-workers 2 --batch-size 16   # in Ray Train
"""TWA as a Hugging Face Trainer callback: a 2-layer BERT (hidden size 64, from a config) trains
4 of 8 epochs ("finish early") at a constant learning rate, a candidate per epoch, then TWA-v
(SGD on the per-tensor coefficients) on the eval dataset; the averaged model is written with
save_pretrained to <out>/twa.

The task is generated here: sequences of 16 tokens over a vocabulary of 32; the label says
whether most tokens come from the lower half of the vocabulary (15% of the train labels flipped).
Nothing is downloaded. Writes <out>/result.json: alpha, the callback's final / SWA / TWA metrics
on the eval dataset (which TWA-v fits on) and, held out from everything, the test accuracy of
the final weights (the last candidate), of SWA (their mean) and of the TWA model.

With --num-workers N the same Trainer runs in a Ray Train TorchTrainer of N workers (next to
ray.train.huggingface.transformers.RayTrainReportCallback, prepare_trainer); every worker runs the
coefficient phase on its shard of the eval data and their coefficient gradients are averaged.
"""

import argparse
import copy
import json
import os
import sys

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from twa_ray.core.layout import Layout, load_flat_
from twa_ray.core.twa import TWAConfig
from twa_ray.integrations.hf import TWACallback
from twa_ray.store import CandidateStore


class Tokens(Dataset):
    """``{"input_ids", "attention_mask", "labels"}`` examples of the counting task."""

    def __init__(
        self, n: int, *, seed: int, noise: float = 0.0, length: int = 16, vocab: int = 32
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = ((self.ids < vocab // 2).sum(1) > length // 2).long()
        flip = torch.rand(n, generator=g) < noise
        self.labels[flip] = 1 - self.labels[flip]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=32,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def build(args):
    """Model, datasets, training arguments and callback (also used by the Ray Train test)."""
    train, val = Tokens(args.n_train, seed=args.seed, noise=0.15), Tokens(256, seed=args.seed + 1)
    targs = TrainingArguments(
        output_dir=args.out,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=True,
        logging_strategy="no",
        dataloader_num_workers=0,
    )
    callback = TWACallback(
        args.store,
        every_n_epochs=1,
        sample_frac=0.5,
        mode="twa-v",
        config=TWAConfig(blocks="tensor", bits=8, lr=0.1, epochs=4.0),
    )
    return tiny_bert(args.seed), train, val, targs, callback


@torch.no_grad()
def held_out(args, callback, model) -> dict:
    """Test accuracy (a split nothing was fit on) of the final weights, SWA and the TWA model."""
    test = Tokens(1024, seed=args.seed + 2)
    store = CandidateStore(callback.snapshots.store)
    flats = [store.read(n) for n in callback.snapshots.names]
    models = {"twa": model}
    for name, flat in (("final", flats[-1]), ("swa", torch.stack(flats).mean(0))):
        models[name] = load_flat_(copy.deepcopy(model), flat, Layout.from_module(model))
    acc = {}
    for name, m in models.items():
        m.eval()
        logits = m(input_ids=test.ids, attention_mask=torch.ones_like(test.ids)).logits
        acc[f"test/{name}_acc"] = float((logits.argmax(1) == test.labels).float().mean())
    return acc


def save(args, callback, model, is_zero: bool = True) -> None:
    if is_zero:
        result = {
            "alpha": callback.twa.alpha.flatten().tolist(),
            **callback.metrics,
            **held_out(args, callback, model),
        }
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k != "alpha"}, indent=1))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="output_dir: candidates, twa/ model, result.json")
    p.add_argument("--store", help="candidate store URI (default OUT/twa_candidates)")
    p.add_argument(
        "--epochs", type=int, default=8, help="num_train_epochs (training stops at half)"
    )
    p.add_argument("--n-train", type=int, default=512, help="training examples")
    p.add_argument("--batch-size", type=int, default=32, help="batch size per device")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (constant)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="Ray Train workers (0: this process)")
    return p.parse_args(argv)


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: the same Trainer, reporting to Ray Train."""
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    args = parse(config["argv"])
    model, train, val, targs, callback = build(args)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=val,
        callbacks=[callback, RayTrainReportCallback()],
    )
    trainer = prepare_trainer(trainer)
    trainer.train()
    save(args, callback, trainer.model, trainer.is_world_process_zero())


def main(argv=None) -> int:
    args = parse(argv)
    if args.num_workers:
        import ray
        import ray.train
        from ray.train.torch import TorchTrainer

        if not ray.is_initialized():
            ray.init()
        TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"argv": list(sys.argv[1:] if argv is None else argv)},
            scaling_config=ray.train.ScalingConfig(
                num_workers=args.num_workers, resources_per_worker={"CPU": 0.5}
            ),
            run_config=ray.train.RunConfig(
                name="hf", storage_path=os.path.abspath(os.path.join(args.out, "ray"))
            ),
        ).fit()
        return 0
    model, train, val, targs, callback = build(args)
    trainer = Trainer(
        model=model, args=targs, train_dataset=train, eval_dataset=val, callbacks=[callback]
    )
    trainer.train()
    save(args, callback, trainer.model, trainer.is_world_process_zero())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
