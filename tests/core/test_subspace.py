import pytest
import torch

from twa_ray.core.layout import Layout
from twa_ray.core.subspace import build_affine, build_span


def make(num=5, sizes=(6, 3, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    layout = Layout(
        tuple(f"p{i}" for i in range(len(sizes))),
        tuple((s,) for s in sizes),
        ("float32",) * len(sizes),
    )
    cands = [torch.randn(layout.numel, generator=g) for _ in range(num)]
    return layout, cands


def test_affine_starts_at_swa_and_spans_normalized_deltas():
    layout, cands = make()
    sub = build_affine(lambda: iter(cands), layout, blocks=layout.blocks("tensor"), bits=32)
    mean = torch.stack(cands).double().mean(0)
    assert torch.allclose(sub.reconstruct(sub.alpha0).double(), mean, atol=1e-6)
    # alpha[k, l] = ||(w_k - c)|_l|| on block l recovers candidate k exactly
    k = 2
    delta = cands[k].double() - mean
    bounds = sub.blocks.bounds
    alpha = torch.zeros(len(cands), sub.num_blocks)
    for l, (a, b) in enumerate(zip(bounds, bounds[1:])):
        alpha[k, l] = delta[a:b].norm()
    assert torch.allclose(sub.reconstruct(alpha).double(), cands[k].double(), atol=1e-5)


def test_affine_zero_norm_block_gives_no_nan():
    layout, cands = make()
    for w in cands:
        w[:6] = 1.5  # block 0 identical in every candidate (a frozen layer)
    sub = build_affine(lambda: iter(cands), layout, blocks=layout.blocks("tensor"), bits=4)
    assert sub.zero_blocks is not None and bool(sub.zero_blocks[:, 0].all())
    assert not bool(sub.zero_blocks[:, 1:].any())
    theta = sub.reconstruct(torch.randn(len(cands), sub.num_blocks))
    assert torch.isfinite(theta).all()
    assert torch.allclose(theta[:6], torch.full((6,), 1.5))
    a = sub.project(torch.randn(layout.numel))
    assert torch.isfinite(a).all() and torch.all(a[:, 0] == 0)


def test_affine_duplicates_and_collinear_candidates_are_fine():
    layout, cands = make(num=3)
    cands = cands + [cands[0].clone(), 2 * cands[1] - cands[2]]
    sub = build_affine(lambda: iter(cands), layout, blocks=layout.blocks("model"), bits=8)
    assert torch.isfinite(sub.basis.scale).all() and torch.isfinite(sub.origin).all()


@pytest.mark.parametrize("builder", ["affine", "span"])
def test_too_few_or_identical_candidates_are_refused(builder):
    layout, cands = make(num=1)
    build = (
        (lambda s: build_affine(s, layout, blocks=layout.blocks("tensor")))
        if builder == "affine"
        else (lambda s: build_span(s, layout))
    )
    with pytest.raises(ValueError, match="at least 2 candidates"):
        build(lambda: iter(cands))
    with pytest.raises(ValueError, match="at least 2 candidates"):
        build(lambda: iter([]))
    with pytest.raises(ValueError, match="identical"):
        build(lambda: iter([cands[0], cands[0].clone()]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_candidate_is_refused(bad):
    layout, cands = make()
    cands[3][4] = bad
    with pytest.raises(ValueError, match="candidate 3 holds NaN or Inf"):
        build_affine(lambda: iter(cands), layout, blocks=layout.blocks("tensor"))


def test_wrong_shape_candidate_is_refused():
    layout, cands = make()
    cands[1] = cands[1][:-1]
    with pytest.raises(ValueError, match="candidate 1 has shape"):
        build_affine(lambda: iter(cands), layout, blocks=layout.blocks("tensor"))


def test_span_basis_is_orthonormal_and_reports_rank_drop():
    layout, cands = make(num=4)
    cands.append(0.5 * (cands[0] + cands[1]))  # in the affine hull of the others: no new direction
    sub = build_span(lambda: iter(cands), layout, bits=32)
    from twa_ray.core.quant import dequantize

    b = dequantize(sub.basis).double()
    assert b.shape[0] == 3  # 5 centred candidates of rank 3 (affine hull of 4 points)
    assert torch.allclose(b @ b.T, torch.eye(3, dtype=torch.float64), atol=1e-5)
    assert len(sub.dropped) == 2
    assert torch.allclose(
        sub.reconstruct(sub.alpha0).double(), torch.stack(cands).double().mean(0), atol=1e-5
    )


def test_quantization_error_shrinks_with_bits():
    layout, cands = make(num=6, sizes=(400, 300))
    errs = []
    for bits in (1, 2, 4, 8):
        sub = build_affine(lambda: iter(cands), layout, blocks=layout.blocks("tensor"), bits=bits)
        errs.append(float(sub.quant_error.max()))
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 0.01
