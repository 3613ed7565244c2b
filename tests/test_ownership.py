"""Who may write a --storage (local and on moto's S3 server on 127.0.0.1) and what --overwrite
deletes there: only what twa-ray wrote, never a byte of anything else (issue 23); one writer at
a time through a heartbeat lease (issue 20)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest

from twa_ray import outdir
from twa_ray.cli import main
from twa_ray.storage import open_storage

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    from s3_faults import moto_s3
except ImportError:  # tests/ became a package
    from tests.s3_faults import moto_s3

TTL = "2"  # seconds: a lease of a dead holder expires fast here


@pytest.fixture(scope="module")
def s3():
    """``(endpoint query, filesystem)`` of a moto S3 server without buckets."""
    with moto_s3(bucket=None) as endpoint:
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint, scheme="http", allow_bucket_creation=True
        )
        yield f"?endpoint_override={endpoint}&scheme=http", fs


@pytest.fixture(autouse=True)
def short_lease(monkeypatch):
    monkeypatch.setenv(outdir.LEASE_TTL_ENV, TTL)
    yield
    outdir.release_all()


_BUCKETS = iter(range(10**6))


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """``(uri of a new prefix, filesystem, its path there)``: a folder, or a prefix in a new bucket."""
    if request.param == "local":
        return str(tmp_path / "st"), pafs.LocalFileSystem(), str(tmp_path / "st")
    query, fs = request.getfixturevalue("s3")
    bucket = f"own{next(_BUCKETS)}"
    fs.create_dir(bucket)
    return f"s3://{bucket}/exp{query}", fs, f"{bucket}/exp"


def _put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def _hashes(fs: pafs.FileSystem, root: str) -> dict[str, str]:
    """BLAKE2b of every file below ``root``, by path."""
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path] = hashlib.blake2b(f.read()).hexdigest()
    return out


def _foreign(fs: pafs.FileSystem, path: str) -> None:
    """A user's files at the top of ``path`` and nested, and beside it (a sibling whose name
    starts with the prefix's: a prefix deletion that is not one by one would take it)."""
    _put(fs, f"{path}/data.csv", b"a,b\n1,2\n")
    _put(fs, f"{path}/sub/x.txt", b"nested")
    _put(fs, f"{path}x/notes.txt", b"beside")


def _a_run(
    st,
    command: str = "run",
    entries=(
        "candidates/c0.arrow",
        "work/ray_train/sampling_run-earlier/checkpoint_000001/state.pt",
        "work/sampling_run-earlier.json",
        "outputs/metrics.json",
    ),
):
    """What a command leaves under its storage: its marker and entries of its layout."""
    outdir._mark(st, command, f"{command}-earlier")
    for rel in entries:
        _put(st.fs, f"{st.path}/{rel}", rel.encode())


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_files_refused_up_front_and_untouched(where, overwrite):
    uri, fs, path = where
    _foreign(fs, path)
    before = _hashes(fs, path.rsplit("/", 1)[0])
    st = open_storage(uri)
    with pytest.raises(
        FileExistsError,
        match=r"holds files twa-ray did not write \(data\.csv, sub\).*new or empty --storage",
    ):
        outdir._claim_storage(st, "run", overwrite=overwrite)
    assert _hashes(fs, path.rsplit("/", 1)[0]) == before  # nothing written, nothing deleted


def test_a_bucket_root_is_a_prefix_like_any_other(s3):
    query, fs = s3
    fs.create_dir("rootb")
    root = open_storage(f"s3://rootb{query}")
    run_id = outdir._claim_storage(root, "run")  # an empty bucket: claimed
    _a_run(root)
    outdir.release_all()
    assert outdir.owner(root) == ("run", run_id)
    assert outdir._claim_storage(root, "run", overwrite=True) != run_id
    assert outdir.foreign(root) == [] and not root.exists("candidates")  # the bucket itself stays
    outdir.release_all()
    _put(
        fs, "rootb/team/important.csv", b"theirs"
    )  # someone else's object: the bucket is shared now
    before = _hashes(fs, "rootb/team")
    for kw in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(FileExistsError, match=r"did not write \(team\).*move them out"):
            outdir._claim_storage(root, "run", **kw)
    assert _hashes(fs, "rootb/team") == before


def test_prefix_shared_by_a_run_and_foreign_files_is_refused(where):
    uri, fs, path = where
    st = open_storage(uri)
    _a_run(st)
    _foreign(fs, path)
    before = _hashes(fs, path.rsplit("/", 1)[0])
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(FileExistsError, match=r"did not write \(data\.csv, sub\)"):
            outdir._check_storage(st, "run", **kw)
        with pytest.raises(FileExistsError, match=r"did not write"):
            outdir._claim_storage(st, "run", **kw)
    assert _hashes(fs, path.rsplit("/", 1)[0]) == before


@pytest.mark.parametrize("earlier", ["run", "sweep"])
def test_overwrite_deletes_only_what_the_earlier_command_wrote(where, earlier):
    """After a finished run, or a sweep (another command): its entries go, one by one; the
    siblings of the prefix, and the prefix itself, stay."""
    uri, fs, path = where
    st = open_storage(uri)
    _put(fs, f"{path}x/notes.txt", b"beside")
    _put(fs, f"{path.rsplit('/', 1)[0]}/top.txt", b"above")
    if earlier == "run":
        _a_run(st)
    else:
        _a_run(
            st,
            "sweep",
            (
                "plan.json",
                "sampling/g0/candidates/c.arrow",
                "tune/sweep/state.json",
                "outputs/summary.json",
            ),
        )
    outside = {
        p: h for p, h in _hashes(fs, path.rsplit("/", 1)[0]).items() if not p.startswith(path + "/")
    }
    with pytest.raises(FileExistsError, match=f"already holds a {earlier}"):
        outdir._claim_storage(st, "run")
    run_id = outdir._claim_storage(st, "run", overwrite=True)
    assert outdir.owner(st) == ("run", run_id)
    left = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)))
    assert left == sorted([outdir.LEASE, "run.json"])
    assert {
        p: h for p, h in _hashes(fs, path.rsplit("/", 1)[0]).items() if not p.startswith(path + "/")
    } == outside


HOLDER = """
import os, sys, time
from twa_ray import outdir
from twa_ray.storage import open_storage
st = open_storage(sys.argv[1])
run_id = outdir._claim_storage(st, "run", overwrite=True)
st.write_json(f"work/sampling_{run_id}.json", {"at": "sampling"})
print(run_id, flush=True)
time.sleep(600)
"""


def _holder(uri: str) -> tuple[subprocess.Popen, str]:
    """A process that claims ``uri`` (a crashed or live run) and sleeps; returns it and its run id."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri], stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    assert run_id.startswith("run-"), run_id
    return proc, run_id


def test_live_writer_refuses_a_second_claim_and_a_crashed_one_does_not(where):
    """Two processes: a live holder refuses a second claim (with --resume or --overwrite too)
    and keeps its lease; after its SIGKILL, --overwrite deletes only its entries."""
    uri, fs, path = where
    _put(fs, f"{path}x/notes.txt", b"beside")
    proc, run_id = _holder(uri)
    try:
        st = open_storage(uri)
        lease = st.read_json(outdir.LEASE)
        for kw in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(
                FileExistsError, match=f"is being written by run {run_id} \\(pid {proc.pid} "
            ):
                outdir._claim_storage(st, "run", **kw)
        assert st.read_json(outdir.LEASE)["token"] == lease["token"]  # the live run keeps it
        assert st.read_json(f"work/sampling_{run_id}.json") == {"at": "sampling"}
    finally:
        proc.kill()
        proc.wait()
    beside = _hashes(fs, f"{path}x")
    assert (
        outdir._claim_storage(st, "run", resume=True) == run_id
    )  # the crashed run resumes at once
    outdir.release_all()
    new = outdir._claim_storage(st, "run", overwrite=True)
    assert new != run_id and not st.exists("work") and _hashes(fs, f"{path}x") == beside


@pytest.mark.parametrize("where", ["s3"], indirect=True)
def test_a_lease_without_heartbeat_expires(where):
    """A holder that stops renewing (SIGSTOP: alive, hung) loses its lease after the ttl."""
    uri, _fs, _path = where
    proc, run_id = _holder(uri)
    st = open_storage(uri)
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        with pytest.raises(FileExistsError, match=run_id):
            outdir._check_storage(st, "run", resume=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                assert outdir._claim_storage(st, "run", resume=True) == run_id
                break
            except FileExistsError:
                time.sleep(0.5)
        else:
            pytest.fail("the lease of a hung holder never expired")
        assert st.read_json(outdir.LEASE)["pid"] == os.getpid()
    finally:
        proc.kill()
        proc.wait()


def test_import_into_a_store_being_written_is_refused(tmp_path, capsys):
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from twa_ray import outdir; from twa_ray.storage import open_storage\n"
            "outdir._hold(open_storage(sys.argv[1]), 'import'); print('held', flush=True); time.sleep(600)",
            str(store),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        assert main(["import", str(tmp_path / "ckpts"), "--out", str(store)]) == 2
        err = capsys.readouterr().err
        assert (
            f"--out {str(store)!r} is being written by import import-" in err
            and err.count("\n") == 1
        )
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_cli_refuses_a_storage_with_foreign_files_before_ray(where, tmp_path, capsys, extra):
    import ray

    uri, fs, path = where
    _foreign(fs, path)
    before = _hashes(fs, path.rsplit("/", 1)[0])
    out = tmp_path / "o"
    assert main(["run", "--smoke-test", "--storage", uri, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("twa-ray: error: --storage ")
        and "did not write (data.csv, sub)" in err
        and err.count("\n") == 1
    )
    assert _hashes(fs, path.rsplit("/", 1)[0]) == before
    assert not out.exists() and not ray.is_initialized()


def test_average_adds_to_a_runs_storage_under_the_same_rules(where):
    """``average --storage`` adds ``average/`` to a run's storage: leased, and refused once
    foreign files lie there; a sweep does not take over a run's storage without --overwrite."""
    uri, fs, path = where
    st = open_storage(uri)
    _a_run(st)
    outdir._hold(st, "average")
    assert st.read_json(outdir.LEASE)["command"] == "average"
    outdir.release_all()
    assert not st.exists(outdir.LEASE)
    with pytest.raises(FileExistsError, match="already holds a run.*pass --overwrite"):
        outdir._claim_storage(st, "sweep")
    _put(fs, f"{path}/mine.txt", b"x")
    before = _hashes(fs, path)
    with pytest.raises(FileExistsError, match=r"did not write \(mine\.txt\)"):
        outdir._hold(st, "average")
    assert _hashes(fs, path) == before


def test_out_and_storage_are_claimed_together_with_one_id(tmp_path):
    """The claim of run and sweep: --storage first, then --out (elsewhere) with the same id; a
    refused storage leaves --out as it was, and a new --out is removed again."""
    st, out = open_storage(str(tmp_path / "st")), tmp_path / "o"
    with outdir.claimed(outdir.Request("sweep", str(out), st.uri)) as outputs:
        run_id = outputs.claim()
        assert outdir.owner(st) == outdir.owner(out) == ("sweep", run_id)
        (out / "summary.json").write_text("{}")
    (tmp_path / "st" / "notes.txt").write_text("mine")
    before = _hashes(pafs.LocalFileSystem(), str(tmp_path))
    with pytest.raises(FileExistsError, match=r"did not write \(notes\.txt\)"):
        with outdir.claimed(outdir.Request("sweep", str(out), st.uri, overwrite=True)) as outputs:
            outputs.claim()
    assert _hashes(pafs.LocalFileSystem(), str(tmp_path)) == before
    new = tmp_path / "new"
    with pytest.raises(FileExistsError, match=r"did not write \(notes\.txt\)"):
        with outdir.claimed(outdir.Request("run", str(new), st.uri, overwrite=True)):
            pass
    assert not new.exists()


def test_claimed_runs_the_lifecycle_in_order_and_releases(tmp_path):
    """Nothing is written before :meth:`Outputs.claim`; after the block the lock and the lease
    are released; a failure after the claim removes a new --out holding only markers."""
    out = tmp_path / "o"
    with outdir.claimed(outdir.Request("run", str(out))) as outputs:
        assert not out.exists()  # checked only
        run_id = outputs.claim()
        assert outdir.owner(out) == ("run", run_id) and (out / outdir.LEASE).exists()
    assert not (out / outdir.LEASE).exists() and not outdir._HELD
    again = tmp_path / "again"
    with pytest.raises(RuntimeError, match="boom"):
        with outdir.claimed(outdir.Request("run", str(again))) as outputs:
            outputs.claim()
            raise RuntimeError("boom")
    assert not again.exists() and not outdir._HELD


NESTED = ["outputs/report.md", "candidates/notes.txt", "work/mine/x.txt"]


@pytest.mark.parametrize("nested", NESTED)
def test_overwrite_refuses_a_foreign_file_inside_a_twa_ray_folder(where, tmp_path, capsys, nested):
    """A user's file inside a folder twa-ray wrote (issue 30 item 6): ``--overwrite`` refuses
    the command before Ray starts, naming it, and deletes nothing."""
    import ray

    uri, fs, path = where
    st = open_storage(uri)
    _a_run(st)
    _put(fs, f"{path}/{nested}", b"the user's")
    before = _hashes(fs, path.rsplit("/", 1)[0])
    assert outdir.foreign(st) == [
        nested.rsplit("/", 1)[0] if nested.startswith("work/") else nested
    ]
    out = tmp_path / "o"
    assert main(["run", "--smoke-test", "--storage", uri, "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    shown = "work/mine" if nested.startswith("work/") else nested
    assert err.startswith("twa-ray: error: --storage ") and err.count("\n") == 1
    assert f"did not write ({shown})" in err and "Traceback" not in err
    assert _hashes(fs, path.rsplit("/", 1)[0]) == before
    assert not out.exists() and not ray.is_initialized()


@pytest.mark.parametrize("nested", NESTED)
def test_overwrite_of_an_out_refuses_a_foreign_file_inside_it(tmp_path, capsys, nested):
    """The same inside a local ``--out`` (no ``--storage``: the whole layout is there)."""
    out = tmp_path / "o"
    st = open_storage(str(out))
    _a_run(st)
    (out / nested).parent.mkdir(parents=True, exist_ok=True)
    (out / nested).write_bytes(b"the user's")
    before = _hashes(pafs.LocalFileSystem(), str(out))
    assert main(["run", "--smoke-test", "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    shown = "work/mine" if nested.startswith("work/") else nested
    assert err.startswith(
        f"twa-ray: error: --out {str(out)!r} holds files twa-ray did not write ({shown})"
    )
    assert err.count("\n") == 1
    assert _hashes(pafs.LocalFileSystem(), str(out)) == before


def test_overwrite_deletes_ray_trees_and_layout_folders_entry_by_entry(where):
    """What Ray Train and Tune wrote below the folders twa-ray names goes as a whole; the
    layout's folders go entry by entry, then themselves."""
    uri, fs, path = where
    st = open_storage(uri)
    _a_run(
        st,
        "sweep",
        (
            "plan.json",
            "sampling/abc123/candidates/c.arrow",
            "sampling/abc123/candidates/.c.1234.tmp",
            "sampling/abc123/ray_train/sampling_sweep-abc123/checkpoint_0/state.pt",
            "sampling/abc123/ray_train/sampling_sweep-abc123/.validate_storage_marker",
            "sampling/abc123/sampling_sweep-abc123.json",
            "sampling/abc123/sampling_done.json",
            "tune/sweep/trial_0000_x/result.json",
            "tune/sweep/experiment_state-2026.json",
            "outputs/summary.json",
            "outputs/coefficients_twa_v.png",
        ),
    )
    assert outdir.foreign(st) == []
    run_id = outdir._claim_storage(st, "run", overwrite=True)
    assert outdir.owner(st) == ("run", run_id)
    left = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    assert left == sorted([outdir.LEASE, "run.json"])
