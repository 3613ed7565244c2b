"""Candidate store: round trips, metadata, atomicity, memory mapping, and refusal of bad input."""

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twa_ray.core.layout import Layout, flatten
from twa_ray.store import FORMAT_VERSION, CandidateInfo, CandidateStore


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g).half(),
        "head.weight": torch.randn(2, 4, generator=g).bfloat16(),
        "head.bias": torch.randn(2, generator=g),
    }


@pytest.fixture
def layout() -> Layout:
    return Layout.from_tensors(_state())


@pytest.fixture
def store(tmp_path) -> CandidateStore:
    return CandidateStore(tmp_path / "store", create=True)


def _only_file(store: CandidateStore, name: str) -> Path:
    return Path(store._os_path(name))


# ---- round trips ---------------------------------------------------------------------------


def test_round_trip_bit_exact_all_dtypes(store, layout):
    state = _state(1)
    name = store.write(state, layout, step=5)
    vec = store.read(name)
    assert vec.dtype == torch.float32 and vec.shape == (layout.numel,)
    assert torch.equal(vec, flatten(state, layout))
    back = store.read_state(name)
    assert list(back) == list(layout.names)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


def test_write_flat_vector_any_dtype(store, layout):
    vec = torch.randn(layout.numel, dtype=torch.float64)
    name = store.write(vec, layout, step=0, name="flat64")
    assert torch.equal(store.read(name), vec.float())
    with pytest.raises(ValueError, match="shape"):
        store.write(vec[:-1], layout, step=1)
    with pytest.raises(ValueError, match="floating point"):
        store.write(torch.zeros(layout.numel, dtype=torch.int64), layout, step=1)


def test_metadata_names_and_order(store, layout):
    assert store.layout is None and len(store) == 0 and store.names() == []
    store.write(_state(0), layout, step=20, epoch=2.5, source="a", seed=7, run_id="r1", name="zz")
    store.write(_state(1), layout, step=10, name="b")
    store.write(_state(2), layout, step=10, name="a")
    default = store.write(_state(3), layout, step=30)
    named = store.write(_state(4), layout, step=40, run_id="trial_3")
    assert default == "step-000000030" and named == "trial_3-step-000000040"
    assert store.names() == ["a", "b", "zz", default, named]
    assert len(store) == 5 and "zz" in store and "nope" not in store and "../x" not in store
    assert store.info("zz") == CandidateInfo("zz", 20, 2.5, "a", 7, "r1")
    assert store.info("a").seed is None
    fresh = CandidateStore(store.uri)  # a new handle reads everything back from the files
    assert fresh.layout == layout and fresh.names() == store.names()


def test_file_is_plain_arrow_with_metadata(store, layout):
    name = store.write(_state(), layout, step=3, epoch=1.0, source="src", seed=1, run_id="r")
    with pa.memory_map(str(_only_file(store, name))) as f:
        reader = pa.ipc.open_file(f)
        meta = reader.schema.metadata
        assert reader.num_record_batches == 1 and reader.schema.names == ["flat"]
        assert reader.schema.field("flat").type == pa.float32()
    assert Layout.from_json(meta[b"twa_ray.layout"]) == layout
    cand = json.loads(meta[b"twa_ray.candidate"])
    # a flat candidate stays format 1: an older twa_ray still reads it
    assert cand["format"] == 1 and cand["fingerprint"] == layout.fingerprint
    assert (cand["step"], cand["epoch"], cand["source"], cand["seed"], cand["run_id"]) == (
        3,
        1.0,
        "src",
        1,
        "r",
    )


def test_iter_flat_streams_in_order(store, layout):
    for i in range(3):
        store.write(_state(i), layout, step=10 - i, name=f"c{i}")
    vecs = list(store.iter_flat())
    assert [torch.equal(v, flatten(_state(i), layout)) for v, i in zip(vecs, [2, 1, 0])] == [
        True
    ] * 3
    (only,) = store.iter_flat(["c1"])
    assert torch.equal(only, flatten(_state(1), layout))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_read_is_memory_mapped_copy_on_write(store, layout):
    name = store.write(_state(), layout, step=0)
    path = _only_file(store, name)
    before = path.read_bytes()
    vec = store.read(name)
    maps = Path("/proc/self/maps").read_text()
    assert str(path) in maps  # zero-copy: the tensor's memory is the file's mapping
    vec.mul_(2)  # writable, private: the file is not modified
    assert path.read_bytes() == before
    assert torch.equal(store.read(name), flatten(_state(), layout))


# ---- filesystems ---------------------------------------------------------------------------


def _stores(tmp_path):
    yield CandidateStore((tmp_path / "plain").as_uri(), create=True)  # file:// URI
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    yield CandidateStore("sub/store", create=True, filesystem=sub)
    mock = pafs._MockFileSystem()  # not the local disk: exercises the generic (s3/gs) code path
    yield CandidateStore("bucket/run", create=True, filesystem=mock)


def test_uris_and_filesystems(tmp_path, layout):
    for store in _stores(tmp_path):
        name = store.write(_state(), layout, step=1, seed=3)
        store.write(_state(1), layout, step=2)
        assert store.names() == [name, "step-000000002"]
        assert torch.equal(store.read(name, verify=True), flatten(_state(), layout))
        assert store.read_state(name)["head.weight"].dtype == torch.bfloat16
        assert store.info(name).seed == 3
        with pytest.raises(FileExistsError):
            store.write(_state(), layout, step=1)
        store.write(_state(2), layout, step=1, overwrite=True)
        assert torch.equal(store.read(name), flatten(_state(2), layout))
        with pytest.raises(FileNotFoundError, match="is not in store"):
            store.read("absent")
    assert (tmp_path / "sub" / "store" / "step-000000001.arrow").is_file()
    assert CandidateStore(str(tmp_path / "plain")).names() == [name, "step-000000002"]


def test_bad_uri(tmp_path):
    with pytest.raises(ValueError, match="URI"):
        CandidateStore("nosuchscheme://x/y")


# ---- refusals ------------------------------------------------------------------------------


def test_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CandidateStore(tmp_path / "absent")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        CandidateStore(tmp_path / "afile")


def test_layout_mismatch_names_both_fingerprints(store, layout):
    store.write(_state(), layout, step=0)
    other_state = {**_state(), "head.bias": torch.randn(3)}
    other = Layout.from_tensors(other_state)
    with pytest.raises(ValueError) as e:
        store.write(other_state, other, step=1)
    msg = str(e.value)
    assert layout.fingerprint[:16] in msg and other.fingerprint[:16] in msg
    assert "head.bias" in msg and "another store" in msg
    assert store.names() == ["step-000000000"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_refused_nothing_written(store, layout, bad):
    state = _state()
    state["head.bias"][1] = bad
    with pytest.raises(ValueError, match="NaN/Inf.*head.bias"):
        store.write(state, layout, step=0)
    assert os.listdir(store.uri) == []


def test_no_silent_overwrite(store, layout):
    store.write(_state(0), layout, step=0, name="x")
    with pytest.raises(FileExistsError, match="already exists"):
        store.write(_state(1), layout, step=0, name="x")
    assert torch.equal(store.read("x"), flatten(_state(0), layout))
    store.write(_state(1), layout, step=9, name="x", overwrite=True)
    assert torch.equal(store.read("x"), flatten(_state(1), layout)) and store.info("x").step == 9
    assert os.listdir(store.uri) == ["x.arrow"]


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x.tmp", "a b", "x" * 201])
def test_bad_names(store, layout, name):
    with pytest.raises(ValueError, match="name"):
        store.write(_state(), layout, step=0, name=name)
    with pytest.raises(ValueError, match="name"):
        store.read(name)


def test_bad_arguments(store, layout):
    with pytest.raises(ValueError, match="step"):
        store.write(_state(), layout, step=-1)
    with pytest.raises(ValueError, match="epoch"):
        store.write(_state(), layout, step=0, epoch=float("nan"))
    with pytest.raises(ValueError, match="seed"):
        store.write(_state(), layout, step=0, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing"):
        store.write({"conv.weight": torch.zeros(4, 3, 3)}, layout, step=0)
    ints = Layout(("n",), ((3,),), ("int64",))
    with pytest.raises(ValueError, match="floating-point"):
        store.write(torch.zeros(3), ints, step=0)


@pytest.mark.parametrize("keep", [0, 1, 8, 100, 0.5, -1, -10])
def test_truncated_file(store, layout, keep):
    name = store.write(_state(), layout, step=0)
    path = _only_file(store, name)
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path.write_bytes(data[:n])
    fresh = CandidateStore(store.uri)
    with pytest.raises(ValueError, match=f"{path}.*delete"):
        fresh.read(name)
    with pytest.raises(ValueError, match=str(path)):
        fresh.names()


def test_corrupt_data_caught_on_every_read(store, layout):
    """A flipped byte in the float data: every read (and iteration) refuses it by its CRC-32;
    only an explicit ``verify=False`` hands the corrupt data out."""
    name = store.write(torch.ones(layout.numel), layout, step=0)
    path = _only_file(store, name)
    data = bytearray(path.read_bytes())
    at = data.find(np.ones(4, np.float32).tobytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        store.read(name)
    with pytest.raises(ValueError, match="CRC"):
        list(store.iter_flat())
    assert not torch.equal(store.read(name, verify=False), torch.ones(layout.numel))


def _column(values: np.ndarray) -> pa.Array:
    # pa.array(ndarray) would import pandas (seconds); the store never does
    return pa.Array.from_buffers(
        pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)]
    )


def _write_arrow(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)


def test_wrong_schema_and_foreign_files(store, layout):
    name = store.write(_state(), layout, step=0)
    path = _only_file(store, name)
    meta = pa.ipc.open_file(pa.memory_map(str(path))).schema.metadata
    wrong = pa.Table.from_arrays(
        [_column(np.zeros(layout.numel, np.int64))], names=["flat"]
    ).replace_schema_metadata(meta)
    _write_arrow(path, wrong)
    with pytest.raises(ValueError, match="wrong schema"):
        CandidateStore(store.uri).read(name)
    _write_arrow(
        path, pa.Table.from_arrays([_column(np.zeros(layout.numel, np.float32))], names=["flat"])
    )
    with pytest.raises(ValueError, match="not a twa_ray candidate"):
        CandidateStore(store.uri).read(name)
    short = pa.Table.from_arrays(
        [_column(np.zeros(3, np.float32))], names=["flat"]
    ).replace_schema_metadata(meta)
    _write_arrow(path, short)
    with pytest.raises(ValueError, match="layout needs"):
        CandidateStore(store.uri).read(name)


def test_newer_format_refused(store, layout):
    name = store.write(_state(), layout, step=0)
    path = _only_file(store, name)
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    meta = dict(table.schema.metadata)
    cand = json.loads(meta[b"twa_ray.candidate"])
    cand["format"] = FORMAT_VERSION + 1
    meta[b"twa_ray.candidate"] = json.dumps(cand).encode()
    _write_arrow(path, table.replace_schema_metadata(meta))
    with pytest.raises(ValueError, match="newer twa_ray"):
        CandidateStore(store.uri).read(name)


def test_candidate_of_another_model_refused_on_read(tmp_path, store, layout):
    store.write(_state(), layout, step=0)
    other = CandidateStore(tmp_path / "other", create=True)
    lin = torch.nn.Linear(2, 2)
    name = other.write(lin.state_dict(), Layout.from_module(lin), step=99, name="stray")
    os.replace(_only_file(other, name), Path(store.uri) / "stray.arrow")
    with pytest.raises(ValueError, match="another model"):
        CandidateStore(store.uri).read("stray")


# ---- atomicity -----------------------------------------------------------------------------


def test_temp_and_foreign_files_ignored(store, layout):
    name = store.write(_state(), layout, step=0)
    root = Path(store.uri)
    (root / f".{name}.abc123.tmp").write_bytes(b"partial")
    (root / ".x.arrow").write_bytes(b"hidden")
    (root / "notes.txt").write_text("hello")
    (root / "sub").mkdir()
    assert store.names() == [name] and len(store) == 1


def _write_forever(root: Path) -> None:
    """Child process body: write 8 MB candidates until killed."""
    torch.set_num_threads(1)  # no OpenMP pool in a forked child
    store = CandidateStore(root, create=True)
    layout = Layout(("w",), ((2_000_000,),), ("float32",))
    for step in range(100_000):
        store.write(torch.full((2_000_000,), float(step)), layout, step=step)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_crash_mid_write_leaves_only_complete_candidates(tmp_path):
    root = tmp_path / "crash"
    pid = os.fork()  # fork, not a fresh interpreter: importing torch again costs seconds
    if pid == 0:
        code = 1
        try:
            _write_forever(root)
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            names = os.listdir(root) if root.is_dir() else []
            if sum(n.endswith(".arrow") for n in names) >= 2 and any(
                n.endswith(".tmp") for n in names
            ):
                # freeze the writer, and kill it only if it is still mid-write (a temp file exists)
                os.kill(pid, signal.SIGSTOP)
                if any(n.endswith(".tmp") for n in os.listdir(root)):
                    break
                os.kill(pid, signal.SIGCONT)
            time.sleep(0.0002)
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    store = CandidateStore(root)
    names = store.names()
    assert len(names) >= 2
    assert any(n.endswith(".tmp") for n in os.listdir(root))  # the crash left a temp file behind
    for name in names:  # every listed candidate is complete
        expected = torch.full((2_000_000,), float(store.info(name).step))
        assert torch.equal(store.read(name, verify=True), expected)
    new = store.write(torch.zeros(2_000_000), store.layout, step=10**6)  # the store stays usable
    assert store.names()[-1] == new


# ---- fuzzing -------------------------------------------------------------------------------


def _valid_file_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        store = CandidateStore(d, create=True)
        layout = Layout.from_tensors(_state())
        name = store.write(_state(), layout, step=1)
        return Path(store._os_path(name)).read_bytes()


_VALID = _valid_file_bytes()
_FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=list(HealthCheck))


def _expect_clean(data: bytes) -> None:
    """Reading ``data`` as a candidate: a ValueError, or (rarely) the exact original values."""
    with tempfile.TemporaryDirectory() as d:
        Path(d, "fuzz.arrow").write_bytes(data)
        store = CandidateStore(d)
        try:
            vec = store.read("fuzz", verify=True)
        except ValueError:
            pass
        else:
            assert torch.equal(vec, flatten(_state(), Layout.from_tensors(_state())))
        try:
            store.info("fuzz")
            store.names()
        except ValueError:
            pass


@_FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data):
    _expect_clean(data)


@_FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    st.integers(1, len(_VALID)),
)
def test_fuzz_mutated_file(edits, keep):
    data = bytearray(_VALID)
    for at, byte in edits:
        data[at] = byte
    _expect_clean(bytes(data[:keep]))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_COLUMN_TYPES = [
    pa.float32(),
    pa.float64(),
    pa.float16(),
    pa.int64(),
    pa.int8(),
    pa.string(),
    pa.list_(pa.float32()),
]


def _column_of(typ: pa.DataType, n: int, nulls: bool) -> pa.Array:
    if pa.types.is_string(typ):
        values: list = ["a"] * n
    elif pa.types.is_list(typ):
        values = [[0.0]] * n
    else:
        values = [0] * n
    if nulls and n:
        values[0] = None
    return pa.array(values, type=typ)


@settings(max_examples=60, deadline=2000, suppress_health_check=list(HealthCheck))
@given(
    columns=st.lists(
        st.tuples(
            st.sampled_from(["flat", "x", ""]), st.sampled_from(_COLUMN_TYPES), st.booleans()
        ),
        min_size=0,
        max_size=3,
    ),
    length=st.integers(0, 40),
    layout_edit=st.one_of(st.none(), _JSON, st.binary(max_size=40)),
    candidate_edits=st.dictionaries(
        st.sampled_from(
            [
                "format",
                "fingerprint",
                "numel",
                "step",
                "epoch",
                "source",
                "seed",
                "run_id",
                "name",
                "crc32",
                "extra",
            ]
        ),
        st.one_of(st.just("<delete>"), _JSON),
        max_size=4,
    ),
    drop_key=st.sampled_from([None, b"twa_ray.layout", b"twa_ray.candidate"]),
)
def test_fuzz_schema_variations(columns, length, layout_edit, candidate_edits, drop_key):
    """Random columns (names, types, nulls, lengths) under valid-looking, edited or missing
    metadata: reading is the stored values or one clean ValueError, never a crash or a hang."""
    meta = dict(pa.ipc.open_file(pa.BufferReader(_VALID)).schema.metadata)
    if layout_edit is not None:
        meta[b"twa_ray.layout"] = (
            layout_edit if isinstance(layout_edit, bytes) else json.dumps(layout_edit).encode()
        )
    cand = json.loads(meta[b"twa_ray.candidate"])
    for key, value in candidate_edits.items():
        if value == "<delete>":
            cand.pop(key, None)
        else:
            cand[key] = value
    meta[b"twa_ray.candidate"] = json.dumps(cand).encode()
    if drop_key is not None:
        meta.pop(drop_key)
    arrays = [_column_of(typ, length, nulls) for _, typ, nulls in columns]
    names = [name for name, _, _ in columns]
    table = pa.Table.from_arrays(arrays, names=names) if columns else pa.table({})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema.with_metadata(meta)) as w:
        if columns:
            w.write_table(table)
    _expect_clean(sink.getvalue().to_pybytes())
