"""twa_ray.storage on a local folder and on a real S3 server (moto's, on 127.0.0.1)."""

from __future__ import annotations

import pytest
import torch

from twa_ray.core.layout import Layout
from twa_ray.storage import check_multi_node, join_uri, open_storage
from twa_ray.store import CandidateStore

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    from s3_faults import moto_s3
except ImportError:  # tests/ became a package
    from tests.s3_faults import moto_s3


@pytest.fixture(scope="module")
def s3_uri():
    with moto_s3() as endpoint:
        yield f"s3://bkt/runs/x?endpoint_override={endpoint}&scheme=http"


def test_join_keeps_the_query_of_a_uri():
    uri = "s3://b/p?endpoint_override=h:1&scheme=http"
    assert (
        join_uri(uri, "work", "ray_train")
        == "s3://b/p/work/ray_train?endpoint_override=h:1&scheme=http"
    )
    assert join_uri("s3://b/p/", "c") == "s3://b/p/c"
    assert join_uri("/a/b", "c", "d") == "/a/b/c/d"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_json_upload_and_sizes(where, tmp_path, s3_uri):
    st = open_storage(str(tmp_path / "st") if where == "local" else s3_uri)
    assert st.local == (where == "local")
    assert not st.exists("run.json")
    st.write_json("run.json", {"run_id": "r1"})
    st.child("work").write_json("a.json", [1, 2])
    assert st.read_json("run.json") == {"run_id": "r1"} and st.exists("work/a.json")
    assert st.join("work") == join_uri(st.uri, "work")
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.json").write_text("{}")
    (src / "x.bin").write_bytes(b"\0" * 1000)
    assert st.upload(src, "outputs", ["m.json", "x.bin", "absent.png"]) == 1002
    st.download("outputs", tmp_path / "back")
    assert (tmp_path / "back" / "x.bin").read_bytes() == b"\0" * 1000
    assert st.bytes_under("outputs") == 1002
    # Ray Train / Tune: a path inside the filesystem when one is given
    args = st.train_args()
    assert (args["storage_filesystem"] is None) == st.local and "://" not in args["storage_path"]


def test_candidate_store_on_s3(s3_uri):
    """A single PUT per candidate on S3 (no rename there): list, read back bit for bit."""
    model = torch.nn.Linear(4, 3)
    layout = Layout.from_module(model)
    store = CandidateStore(join_uri(s3_uri, "candidates"), create=True)
    name = store.write(model.state_dict(), layout, step=7)
    assert store.names() == [name] and store.info(name).step == 7
    assert torch.equal(
        store.read(name), torch.cat([p.detach().flatten() for p in model.parameters()])
    )


def test_bad_uri_is_one_clear_error():
    with pytest.raises(ValueError, match="--storage 'nosuch://x'"):
        open_storage("nosuch://x")


def test_multi_node_check_needs_no_ray_for_uris_or_shared_fs():
    check_multi_node({"--storage": "s3://b/p"}, shared_fs=False)
    check_multi_node({"--storage": "/nfs/runs"}, shared_fs=True)
