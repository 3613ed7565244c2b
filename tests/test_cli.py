"""twa-ray average / import on a real candidate store (no Ray), and clean CLI errors."""

import json

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from twa_ray.cli import main
from twa_ray.core.layout import Layout, flatten
from twa_ray.data import load_dataset
from twa_ray.models import build_model
from twa_ray.store import CandidateStore

NUM_SAMPLES = 800


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MNIST-1D MLP trained for 4 epochs: 4 epoch snapshots in a store and as .pt files."""
    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    splits = load_dataset("mnist1d", num_samples=NUM_SAMPLES, seed=0)
    model = build_model("mlp", num_classes=splits.num_classes, input_shape=splits.input_shape)
    layout = Layout.from_module(model)
    store = CandidateStore(str(root / "store"), create=True)
    (root / "pt").mkdir()
    x, y = splits.train.tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(4):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
        store.write(flatten(model, layout), layout, step=epoch + 1, epoch=epoch + 1, source="test")
        torch.save(model.state_dict(), root / "pt" / f"epoch{epoch}.pt")
    return root


def test_average_writes_metrics_model_and_coefficients(trained, tmp_path):
    out = tmp_path / "avg"
    argv = ["average", "--store", str(trained / "store"), "--dataset", "mnist1d", "--num-samples",
            str(NUM_SAMPLES), "--model", "mlp", "--mode", "v", "--bits", "4", "--blocks", "tensor",
            "--twa-epochs", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("swa", "greedy_soup", "twa_v"):
        assert 0.0 <= metrics["methods"][name]["test_acc"] <= 1.0
    assert metrics["num_candidates"] == 4
    state = load_file(out / "model.safetensors")
    assert "layers.0.weight" in state or len(state) > 4  # parameters and BN buffers
    table = pq.read_table(out / "coefficients.parquet").to_pandas()
    assert set(table.variant) == {"twa_v"} and len(table) == 4 * metrics["subspace"]["blocks"]
    assert (out / "coefficients_twa_v.png").stat().st_size > 0


def test_import_then_average_from_a_checkpoint_folder(trained, tmp_path):
    store = tmp_path / "imported"
    assert main(["import", str(trained / "pt"), "--out", str(store), "--model", "mlp"]) == 0
    assert len(CandidateStore(str(store))) == 4
    out = tmp_path / "avg"
    argv = ["average", "--store", str(trained / "pt"), "--num-samples", str(NUM_SAMPLES), "--mode", "t",
            "--no-greedy-soup", "--twa-epochs", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "greedy_soup" not in json.loads((out / "metrics.json").read_text())["methods"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--bits", "3"], "bits=3"),
        (["--blocks", "layer"], "blocks='layer'"),
        (["--twa-lr", "-1"], "lr=-1.0"),
        (["--store", "/nonexistent/store"], "does not exist"),
        (["--model", "cnn1d"], "layout"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(trained, tmp_path, capsys, argv, needle):
    base = {"--store": str(trained / "store"), "--num-samples": str(NUM_SAMPLES), "--out": str(tmp_path / "o")}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    before = sorted(p.name for p in (trained / "store").iterdir())
    assert main(["average", *[t for kv in base.items() for t in kv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twa-ray: error:") and needle in err and "Traceback" not in err
    assert sorted(p.name for p in (trained / "store").iterdir()) == before  # nothing changed


def test_unwritable_out_is_refused(trained, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["average", "--store", str(trained / "store"), "--out", str(blocker / "sub")]
    assert main(argv) == 2
    assert "not a writable directory" in capsys.readouterr().err


def test_bring_your_own_model_and_data(trained, tmp_path, monkeypatch):
    """--model / --dataset as import paths to callables defined only here."""
    (tmp_path / "my_pkg.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "from torch.utils.data import TensorDataset\n"
        "from twa_ray.data import load_dataset\n\n"
        "def build(num_classes, input_shape):\n"
        "    return nn.Sequential(nn.Linear(input_shape[0], 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, num_classes))\n\n"
        f"def data(seed=0):\n"
        f"    s = load_dataset('mnist1d', num_samples={NUM_SAMPLES}, seed=seed)\n"
        "    return s.train, s.val, s.test\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_pkg  # noqa: F401  (the module the CLI will import by name)

    splits = load_dataset("mnist1d", num_samples=NUM_SAMPLES, seed=0)
    model = my_pkg.build(splits.num_classes, splits.input_shape)
    layout = Layout.from_module(model)
    store = CandidateStore(str(tmp_path / "byo"), create=True)
    for step in range(3):
        torch.manual_seed(step)
        store.write(flatten(my_pkg.build(splits.num_classes, splits.input_shape), layout), layout, step=step)
    out = tmp_path / "out"
    argv = ["average", "--store", str(tmp_path / "byo"), "--dataset", "my_pkg:data", "--model", "my_pkg:build",
            "--mode", "t", "--twa-epochs", "1", "--no-greedy-soup", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "twa_t" in json.loads((out / "metrics.json").read_text())["methods"]
