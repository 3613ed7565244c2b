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


# ---- tied parameters, training order, half precision (issue 21) ------------------------------


def _tied(seed: int) -> nn.Module:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from tied_model import build
    finally:
        sys.path.pop(0)
    torch.manual_seed(seed)
    return build(3, (4,))


def test_tied_parameters_import_from_torch_save_and_save_model(tmp_path):
    """A tied tensor (lm_head.weight = wte.weight) is one tensor of the layout, whether the
    checkpoint holds both names (torch.save) or one (safetensors save_model keeps lm_head.weight,
    not the name named_parameters() gives it); without --model the second name is dropped too."""
    from safetensors.torch import save_model

    from twa_ray.store import tied_names

    model = _tied(0)
    layout = Layout.from_module(model)
    assert "lm_head.weight" not in layout.names and tied_names(model) == {
        "wte.weight": ("lm_head.weight",)
    }
    src = tmp_path / "ckpts"
    src.mkdir()
    torch.save(_tied(1).state_dict(), src / "a.pt")
    save_model(_tied(2), str(src / "b.safetensors"))
    assert "wte.weight" not in load_state_dict(src / "b.safetensors")  # one name only
    got = import_checkpoints(src, str(tmp_path / "store"), layout=layout, aliases=tied_names(model))
    store = CandidateStore(tmp_path / "store")
    for name, seed in zip(got.names, (1, 2)):
        assert torch.equal(store.read(name), flatten(_tied(seed), layout))
    with pytest.raises(ValueError, match="'wte.weight' of the model is missing"):
        import_checkpoints(src / "b.safetensors", str(tmp_path / "s2"), layout=layout)  # no aliases
    inferred = import_checkpoints(src / "a.pt", str(tmp_path / "s3"))
    stored = CandidateStore(tmp_path / "s3").layout
    assert (
        inferred.names == ["a"]
        and stored.numel == layout.numel
        and "lm_head.weight" not in stored.names
    )


def test_candidates_follow_training_order(tmp_path, layout):
    """Numbers in file names compare as numbers; a recorded global_step / step beats the names;
    Hugging Face checkpoint-N folders give their N; the order is the stored step and is shown."""
    names = tmp_path / "names"
    names.mkdir()
    for epoch in (8, 9, 10, 11):
        torch.save(_sd(epoch), names / f"epoch={epoch}.pt")
    got = import_checkpoints(names, str(tmp_path / "s1"), layout=layout)
    assert got.names == ["epoch_8", "epoch_9", "epoch_10", "epoch_11"] and got.order == "file name"
    store = CandidateStore(tmp_path / "s1")
    assert store.names() == got.names and [store.info(n).step for n in got.names] == [0, 1, 2, 3]
    assert "ordered by file name: epoch_8, epoch_9, epoch_10, epoch_11" in got.summary("s1")

    lightning = tmp_path / "lightning"
    lightning.mkdir()
    for name, step in (
        ("a", 300),
        ("b", 100),
        ("c", 200),
    ):  # names say a, b, c; training says b, c, a
        torch.save(
            {"global_step": step, "epoch": step // 100, "state_dict": _sd(step)},
            lightning / f"{name}.ckpt",
        )
    got = import_checkpoints(lightning, str(tmp_path / "s2"), layout=layout)
    assert (
        got.names == ["b", "c", "a"]
        and got.order == "training step"
        and got.progress == [100, 200, 300]
    )
    assert "ordered by training step (100 .. 300)" in got.summary("s2")
    assert [CandidateStore(tmp_path / "s2").info(n).epoch for n in got.names] == [1.0, 2.0, 3.0]

    hf = tmp_path / "hf"
    for step in (1000, 500, 1500):
        (hf / f"checkpoint-{step}").mkdir(parents=True)
        save_file(_sd(step), str(hf / f"checkpoint-{step}" / "model.safetensors"))
    got = import_checkpoints(hf, str(tmp_path / "s3"), layout=layout)
    assert (
        got.names == ["checkpoint-500", "checkpoint-1000", "checkpoint-1500"]
        and got.order == "training step"
    )


def test_half_precision_is_upcast_and_rounding_is_refused(tmp_path, layout):
    """bf16 / fp16 / mixed checkpoints are upcast exactly to the model's float32 (said in the
    summary); float64 would round: refused, naming the dtype and not the architecture."""
    src = tmp_path / "ckpts"
    src.mkdir()
    sds = {
        "bf16": {k: v.bfloat16() if v.is_floating_point() else v for k, v in _sd(1).items()},
        "fp16": {k: v.half() if v.is_floating_point() else v for k, v in _sd(2).items()},
    }
    sds["mixed"] = {**_sd(3), "0.weight": _sd(3)["0.weight"].bfloat16()}
    for name, sd in sds.items():
        torch.save(sd, src / f"{name}.pt")
    got = import_checkpoints(src, str(tmp_path / "store"), layout=layout)
    store = CandidateStore(tmp_path / "store")
    for name in got.names:
        assert torch.equal(
            store.read(name), flatten({k: v.float() for k, v in sds[name].items()}, layout)
        )
    n = len(layout.names)  # every parameter of bf16 and fp16, one of mixed
    assert got.upcast == {"bfloat16": n + 1, "float16": n}
    assert (
        f"upcast losslessly to the model's dtype: {n + 1} bfloat16, {n} float16 tensors"
        in got.summary("s")
    )
    inferred = import_checkpoints(src / "bf16.pt", str(tmp_path / "s2"))  # no --model: float32 too
    assert set(CandidateStore(tmp_path / "s2").layout.dtypes) == {"float32"} and inferred.upcast
    torch.save({k: v.double() for k, v in _sd(4).items()}, src / "f64.pt")
    with pytest.raises(
        ValueError, match="has dtype float64, expected float32: converting it would round"
    ) as e:
        import_checkpoints(src / "f64.pt", str(tmp_path / "s3"), layout=layout)
    assert "architecture" not in str(e.value)


def test_a_second_import_comes_after_the_candidates_already_there(tmp_path, layout):
    src = tmp_path / "ckpts"
    src.mkdir()
    for i in (1, 2):
        torch.save(_sd(i), src / f"z{i}.pt")
    store_dir = tmp_path / "store"
    CandidateStore(store_dir, create=True).write(_sd(9), layout, step=4, name="a-sampled")
    got = import_checkpoints(src, str(store_dir), layout=layout)
    assert CandidateStore(store_dir).names() == ["a-sampled", *got.names]
    assert [CandidateStore(store_dir).info(n).step for n in got.names] == [5, 6]
