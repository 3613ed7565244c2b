# python examples/lightning_ray_train.py --out /tmp/twa_lightning_ray --num-workers 2
"""TWA as a Lightning callback inside Ray Train: the example of lightning_single.py on a
TorchTrainer of N workers (RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback,
prepare_trainer). Every worker runs the coefficient phase on its part of the val data; their
coefficient gradients are averaged, so alpha is the same on all of them. Writes
<out>/result.json from rank 0.

Connects to a running Ray cluster when there is one (``ray.init()``), else starts a local one.
"""

import os
import sys

import lightning.pytorch as pl
import ray
import ray.cloudpickle
import ray.train
from ray.train.lightning import (
    RayDDPStrategy,
    RayLightningEnvironment,
    RayTrainReportCallback,
    prepare_trainer,
)
from ray.train.torch import TorchTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lightning_single  # noqa: E402  (the model, task and callback of the one-machine example)

ray.cloudpickle.register_pickle_by_value(lightning_single)  # workers need not find examples/


def train_loop_per_worker(config: dict) -> None:
    args = lightning_single.parse(config["argv"])
    model, (train, val), callback = lightning_single.build(args)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices="auto",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        callbacks=[callback, RayTrainReportCallback()],
        **lightning_single.trainer_kwargs(args),
    )
    trainer = prepare_trainer(trainer)
    trainer.fit(model, train, val)
    lightning_single.save(args, callback, trainer)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    num_workers = 2
    if "--num-workers" in argv:
        i = argv.index("--num-workers")
        num_workers = int(argv[i + 1])
        del argv[i : i + 2]
    args = lightning_single.parse(argv)
    if not ray.is_initialized():
        ray.init()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"argv": argv},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, resources_per_worker={"CPU": 0.5}
        ),
        run_config=ray.train.RunConfig(
            name="lightning", storage_path=os.path.abspath(os.path.join(args.out, "ray"))
        ),
    )
    trainer.fit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
