import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from twa_ray.core.layout import Layout, flatten, load_flat_, parse_blocks, unflatten


def small_net() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    net[0].bias.requires_grad_(False)  # frozen parameters are not part of the layout
    return net


def test_layout_excludes_frozen_and_buffers():
    layout = Layout.from_module(small_net())
    assert layout.names == ("0.weight", "1.weight", "1.bias", "2.weight", "2.bias")
    assert layout.numel == 12 + 4 + 4 + 8 + 2


def test_flatten_unflatten_round_trip_keeps_dtypes():
    tensors = {
        "a": torch.randn(2, 3),
        "b": torch.randn(5).to(torch.float16),
        "c": torch.randn(1, 1, 2),
    }
    layout = Layout.from_tensors(tensors)
    flat = flatten(tensors, layout)
    assert flat.dtype == torch.float32 and flat.shape == (layout.numel,)
    back = unflatten(flat, layout)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype
        assert torch.equal(back[name], t)


def test_load_flat_writes_parameters():
    net = small_net()
    layout = Layout.from_module(net)
    vec = torch.arange(layout.numel, dtype=torch.float32)
    load_flat_(net, vec, layout)
    assert torch.equal(flatten(net, layout), vec)


def test_fingerprint_is_stable_and_refuses_other_models():
    a = Layout.from_module(small_net())
    assert Layout.from_json(a.to_json()).fingerprint == a.fingerprint
    b = Layout.from_module(nn.Sequential(nn.Linear(3, 5)))
    with pytest.raises(ValueError, match="same architecture"):
        a.check_compatible(b)


def test_flatten_shape_mismatch_is_clear():
    layout = Layout.from_tensors({"w": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="shape"):
        flatten({"w": torch.zeros(3)}, layout)
    with pytest.raises(ValueError, match="missing"):
        flatten({"v": torch.zeros(2, 2)}, layout)


@given(st.lists(st.integers(1, 50), min_size=1, max_size=12), st.integers(1, 120))
def test_size_blocks_partition(sizes, min_size):
    layout = Layout(
        tuple(f"p{i}" for i in range(len(sizes))),
        tuple((s,) for s in sizes),
        ("float32",) * len(sizes),
    )
    blocks = layout.blocks(f"size:{min_size}")
    assert blocks.bounds[0] == 0 and blocks.bounds[-1] == layout.numel
    assert set(blocks.bounds) <= set(layout.offsets)  # blocks never cut a tensor
    if blocks.num_blocks > 1:
        assert all(s >= min_size for s in blocks.sizes)
    assert layout.blocks("model").num_blocks == 1
    assert layout.blocks("tensor").num_blocks == len(sizes)


@pytest.mark.parametrize("spec", ["layer", "size:", "size:0", "size:x", ""])
def test_bad_block_spec(spec):
    with pytest.raises(ValueError, match="'model', 'tensor' or 'size:N'"):
        parse_blocks(spec)
