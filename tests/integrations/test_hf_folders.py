"""Hugging Face folders in and out: import -> average -> from_pretrained, against float64."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("transformers")

from tests.integrations.tiny_hf import IMAGE, vit  # noqa: E402
from twa_ray.core.layout import Layout  # noqa: E402
from twa_ray.store import hf  # noqa: E402
from twa_ray.store.importers import import_checkpoints, load_state_dict  # noqa: E402
from twa_ray.store.store import CandidateStore  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "twa_ray.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """Three sharded folders: one model, three perturbations of its weights."""
    root = tmp_path_factory.mktemp("hf")
    base = vit()
    for k in range(3):
        torch.manual_seed(100 + k)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.05 * torch.randn_like(p))
        base.save_pretrained(root / "src" / f"ft{k}", max_shard_size="40KB")
    return root


def test_sharded_folder_reads_lazily_and_imports(fine_tuned, tmp_path):
    folder = fine_tuned / "src" / "ft0"
    assert (folder / hf.INDEX).is_file() and len(list(folder.glob("model-*.safetensors"))) > 1
    state = load_state_dict(folder)  # lazy: the model's names, read shard by shard
    assert not isinstance(state, dict) and "vit.layers.0.attention.q_proj.weight" in state
    ref = vit()
    ref.load_state_dict(dict(state), strict=False)
    names = import_checkpoints(
        fine_tuned / "src", str(tmp_path / "store"), layout=Layout.from_module(hf.HFLogits(vit()))
    ).names
    assert names == ["ft0", "ft1", "ft2"]
    theta = CandidateStore(str(tmp_path / "store")).read_state("ft0")
    for n, p in ref.named_parameters():
        assert torch.equal(theta[n], p.detach()), n


def test_average_writes_a_folder_from_pretrained_loads(fine_tuned, tmp_path):
    from transformers import ViTForImageClassification

    out = tmp_path / "avg"
    r = _cli(
        "average",
        "--store",
        str(fine_tuned / "src"),
        "--model",
        f"hf:{fine_tuned / 'src' / 'ft0'}",
        "--dataset",
        "tests.integrations.tiny_hf:images",
        "--mode",
        "t",
        "--blocks",
        "model",
        "--bits",
        "32",
        "--twa-epochs",
        "1",
        "--no-greedy-soup",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    alpha = torch.tensor(
        pq.read_table(out / "coefficients.parquet")
        .to_pandas()
        .query("variant == 'twa_t'")
        .sort_values(["row"])["alpha"]
        .to_numpy(),
        dtype=torch.float64,
    )
    # float64 reference: theta = c + sum_k alpha_k (w_k - c) / |w_k - c|  (affine, one block, no codes)
    ws = [
        torch.cat(
            [
                t.double().flatten()
                for _, t in sorted(load_state_dict(fine_tuned / "src" / f"ft{k}").items())
            ]
        )
        for k in range(3)
    ]
    c = sum(ws) / 3
    theta = c + sum(a * (w - c) / (w - c).norm() for a, w in zip(alpha, ws))
    keys = sorted(load_state_dict(fine_tuned / "src" / "ft0"))
    ref = vit().double()
    offset, state = 0, {}
    for k in keys:
        shape = dict(ref.named_parameters())[k].shape
        state[k] = theta[offset : offset + shape.numel()].view(shape)
        offset += shape.numel()
    ref.load_state_dict(state, strict=False)
    loaded = ViTForImageClassification.from_pretrained(out / "hf_model").eval()
    x = torch.randn(5, *IMAGE)
    with torch.no_grad():
        got, want = loaded(x).logits.double(), ref.eval()(x.double()).logits
    assert not torch.allclose(got, vit().eval()(x).logits.double(), atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert json.loads((out / "metrics.json").read_text())["num_candidates"] == 3
