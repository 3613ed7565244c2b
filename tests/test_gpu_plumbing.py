"""The GPU options reach what they configure, checked on the CPU: bf16 autocast in the sampling
step, loader workers and pinned memory on GPU workers, the flags in the typed configs."""

import torch

from twa_ray.cli import build_parser, config_from_args
from twa_ray.ray.worker import GPU_LOADER_WORKERS, loader_options, train_autocast


def test_precision_flag_reaches_the_sampling_config_and_the_step():
    cfg = config_from_args(build_parser().parse_args(["run", "--precision", "bf16"]))
    assert cfg.sampling.precision == "bf16"
    assert config_from_args(build_parser().parse_args(["run"])).sampling.precision == "fp32"
    layer, x = torch.nn.Linear(8, 4), torch.randn(2, 8)
    with train_autocast(cfg.sampling.precision, torch.device("cpu")):
        assert layer(x).dtype == torch.bfloat16
    with train_autocast("fp32", torch.device("cpu")):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32  # the weights (and candidates) stay float32


def test_loader_options_only_on_gpu_workers():
    assert loader_options(torch.device("cpu")) == {}
    assert loader_options(torch.device("cuda", 0)) == {
        "num_workers": GPU_LOADER_WORKERS,
        "pin_memory": True,
    }
