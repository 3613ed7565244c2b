"""Checkpoint importers: .pt / .safetensors / Ray Train checkpoint directories, and refusals."""

import io
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from twa_ray.core.layout import Layout, flatten
from twa_ray.store import CandidateStore, find_checkpoints, import_checkpoints, load_state_dict


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    m.train()(torch.randn(16, 4))  # non-trivial BN running statistics
    return m


@pytest.fixture
def layout() -> Layout:
    return Layout.from_module(_model(0))


def _sd(seed: int) -> dict[str, torch.Tensor]:
    return _model(seed).state_dict()


def _files(d: Path) -> list[str]:
    return sorted(os.listdir(d)) if d.exists() else []


def test_import_pt_pth_safetensors(tmp_path, layout):
    src = tmp_path / "ckpts"
    src.mkdir()
    torch.save(_sd(1), src / "a.pt")
    torch.save(_sd(2), src / "b.pth")
    save_file(_sd(3), str(src / "c.safetensors"))
    (src / "notes.txt").write_text("not a checkpoint")
    names = import_checkpoints(src, str(tmp_path / "store"), layout=layout).names
    assert names == ["a", "b", "c"]
    store = CandidateStore(tmp_path / "store")
    assert store.names() == names and store.layout == layout
    for i, name in enumerate(names):
        assert torch.equal(store.read(name), flatten(_sd(i + 1), layout))
        info = store.info(name)
        assert info.step == i and info.source == str(
            src / f"{name}{['.pt', '.pth', '.safetensors'][i]}"
        )


def test_inferred_layout_skips_bn_statistics(tmp_path, layout):
    src = tmp_path / "ckpts"
    src.mkdir()
    for i in range(2):
        torch.save(_sd(i), src / f"m{i}.pt")
    import_checkpoints(src, (tmp_path / "store").as_uri())
    assert CandidateStore(tmp_path / "store").layout == layout


def test_nested_state_dicts_and_prefixes(tmp_path, layout):
    src = tmp_path / "ckpts"
    src.mkdir()
    ddp = {f"module.{k}": v for k, v in _sd(1).items()}
    torch.save({"model": ddp, "optimizer": {"state": {}}, "epoch": 3}, src / "ray_style.pt")
    torch.save({"state_dict": _sd(2), "global_step": 10}, src / "lightning.pt")
    compiled = {f"_orig_mod.{k}": v for k, v in _sd(3).items()}
    save_file(compiled, str(src / "compiled.safetensors"))
    names = import_checkpoints(src, str(tmp_path / "store"), layout=layout).names
    store = CandidateStore(tmp_path / "store")
    expected = {"ray_style": 1, "lightning": 2, "compiled": 3}
    assert sorted(names) == sorted(expected)
    for name, seed in expected.items():
        assert torch.equal(store.read(name), flatten(_sd(seed), layout))


def test_ray_train_checkpoint_directories(tmp_path, layout):
    src = tmp_path / "TorchTrainer_1"
    for i in range(3):
        ckpt = src / "trial_0" / f"checkpoint_00000{i}"
        ckpt.mkdir(parents=True)
        if i == 1:
            save_file(_sd(i), str(ckpt / "model.safetensors"))
        else:
            torch.save(_sd(i), ckpt / "model.pt")
        torch.save({"lr": 0.1}, ckpt / "optimizer.pt")  # ignored: not the model
    (src / ".hidden" / "checkpoint_9").mkdir(parents=True)
    torch.save(_sd(9), src / ".hidden" / "checkpoint_9" / "model.pt")
    (src / "trial_0" / "params.json").write_text("{}")
    names = import_checkpoints(src, str(tmp_path / "store"), layout=layout).names
    assert names == [f"trial_0-checkpoint_00000{i}" for i in range(3)]
    store = CandidateStore(tmp_path / "store")
    for i, name in enumerate(names):
        assert torch.equal(store.read(name), flatten(_sd(i), layout))
    # a single checkpoint directory or file works too
    assert [n for n, _ in find_checkpoints(src / "trial_0" / "checkpoint_000000")] == [
        "model",
        "optimizer",
    ]
    assert [n for n, _ in find_checkpoints(src / "trial_0" / "checkpoint_000000" / "model.pt")] == [
        "model"
    ]


def test_name_clashes_get_suffixes(tmp_path):
    src = tmp_path / "ckpts"
    src.mkdir()
    torch.save(_sd(0), src / "a b.pt")
    torch.save(_sd(1), src / "a_b.pth")
    assert [n for n, _ in find_checkpoints(src)] == ["a_b", "a_b-2"]


class _Evil:
    """Unpickling this creates a file: the payload a weights-only load must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_refused_and_not_run(tmp_path, fmt, layout):
    src = tmp_path / "ckpts"
    src.mkdir()
    marker = tmp_path / "pwned"
    payload = {"weight": torch.zeros(2), "evil": _Evil(marker)}
    if fmt == "torch_zip":
        torch.save(payload, src / "evil.pt")
    else:
        (src / "evil.pt").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError, match="evil.pt was refused.*weights_only=True"):
        import_checkpoints(src, str(tmp_path / "store"), layout=layout)
    assert not marker.exists()
    assert not (tmp_path / "store").exists()
    # the payload is live: an unrestricted unpickler would have run it
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Evil(live))).close()
    assert live.exists()


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no checkpoints"):
        import_checkpoints(tmp_path / "empty", str(tmp_path / "store"))
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="no checkpoints"):
        import_checkpoints(tmp_path / "empty", str(tmp_path / "store"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_checkpoints(tmp_path / "absent", str(tmp_path / "store"))
    assert not (tmp_path / "store").exists()


def _bad_checkpoint(kind: str) -> tuple[dict[str, torch.Tensor], str]:
    sd = dict(_sd(5))
    if kind == "missing":
        del sd["3.weight"]
        return sd, "'3.weight' of the model is missing"
    if kind == "shape":
        sd["3.bias"] = torch.zeros(4)
        return sd, r"'3.bias' has shape \[4\], expected \[3\]"
    if kind == "dtype":
        sd["0.weight"] = sd["0.weight"].double()
        return sd, "'0.weight' has dtype float64, expected float32"
    sd["3.bias"] = torch.tensor([0.0, float("nan"), 1.0])
    return sd, "NaN/Inf"


@pytest.mark.parametrize("kind", ["missing", "shape", "dtype", "nan"])
def test_bad_checkpoint_no_partial_import(tmp_path, layout, kind):
    src = tmp_path / "ckpts"
    src.mkdir()
    torch.save(_sd(0), src / "a.pt")
    torch.save(_sd(1), src / "b.pt")
    sd, msg = _bad_checkpoint(kind)
    torch.save(sd, src / "c.pt")
    store_dir = tmp_path / "store"
    CandidateStore(store_dir, create=True).write(_sd(9), layout, step=0, name="existing")
    with pytest.raises(ValueError, match=msg) as e:
        import_checkpoints(src, str(store_dir), layout=layout if kind != "missing" else None)
    assert "c.pt" in str(e.value)
    assert _files(store_dir) == ["existing.arrow"]  # nothing imported, no temp file left


def test_other_model_refused(tmp_path, layout):
    src = tmp_path / "ckpts"
    src.mkdir()
    torch.save(nn.Linear(2, 2).state_dict(), src / "lin.pt")
    store_dir = tmp_path / "store"
    CandidateStore(store_dir, create=True).write(_sd(0), layout, step=0)
    with pytest.raises(ValueError, match="fingerprint"):
        import_checkpoints(src, str(store_dir))  # inferred layout != the store's
    assert _files(store_dir) == ["step-000000000.arrow"]


def test_existing_names_refused(tmp_path, layout):
    src = tmp_path / "ckpts"
    src.mkdir()
    torch.save(_sd(0), src / "a.pt")
    import_checkpoints(src, str(tmp_path / "store"), layout=layout)
    with pytest.raises(FileExistsError, match="'a'"):
        import_checkpoints(src, str(tmp_path / "store"), layout=layout)


@pytest.mark.parametrize(
    "obj, msg",
    [(torch.randn(3), "not a state dict"), ([1, 2], "not a state dict"), ({"a": 1}, "no tensors")],
)
def test_not_a_state_dict(tmp_path, obj, msg):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=msg):
        load_state_dict(tmp_path / "x.pt")


def test_int_only_checkpoint_has_no_layout(tmp_path):
    src = tmp_path / "ckpts"
    src.mkdir()
    torch.save({"steps": torch.tensor([1, 2])}, src / "x.pt")
    with pytest.raises(ValueError, match="no floating-point"):
        import_checkpoints(src, str(tmp_path / "store"))


# ---- fuzzing -------------------------------------------------------------------------------


def _valid_bytes(suffix: str) -> bytes:
    sd = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    if suffix == ".pt":
        buf = io.BytesIO()
        torch.save(sd, buf)
        return buf.getvalue()
    with tempfile.TemporaryDirectory() as d:
        save_file(sd, os.path.join(d, "x.safetensors"))
        return Path(d, "x.safetensors").read_bytes()


_VALID = {s: _valid_bytes(s) for s in (".pt", ".safetensors")}
_FUZZ = settings(max_examples=100, deadline=3000, suppress_health_check=list(HealthCheck))


def _expect_clean_import(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "src")
        src.mkdir()
        Path(src, f"x{suffix}").write_bytes(data)
        try:
            import_checkpoints(src, os.path.join(d, "store"))
        except ValueError:
            assert not Path(d, "store").exists()


@_FUZZ
@given(st.binary(max_size=2048), st.sampled_from([".pt", ".pth", ".safetensors"]))
def test_fuzz_random_bytes(data, suffix):
    _expect_clean_import(data, suffix)


@_FUZZ
@given(
    st.sampled_from([".pt", ".safetensors"]),
    st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6
    ),
    st.floats(0, 1),
)
def test_fuzz_mutated_checkpoint(suffix, edits, keep):
    data = bytearray(_VALID[suffix])
    for at, byte in edits:
        data[int(at * len(data))] = byte
    _expect_clean_import(bytes(data[: max(1, int(keep * len(data)))]), suffix)
