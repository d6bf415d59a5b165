"""PCA feature mimicking (gplq_mm/models/mimic.py): k selection, the
streaming PCA basis and the loss of paper eq. 2."""
import pytest
import torch

from gplq_mm.models.mimic import (MimicConfig, PCAAccumulator, mimic_loss,
                                  pool_feature, select_k)


def _evals_reaching(ratio_at: int, c: int, share: float = 0.61):
    """Descending eigenvalues whose cumulative share first reaches ``share``
    (> 0.6) at k = ratio_at."""
    top = torch.ones(ratio_at, dtype=torch.float64)
    rest_total = ratio_at / share - ratio_at
    rest = torch.full((c - ratio_at, ), rest_total / (c - ratio_at),
                      dtype=torch.float64)
    evals = torch.cat([top, rest])
    assert bool((evals[:-1] >= evals[1:]).all())
    return evals


def test_select_k_rounds_up_to_the_multiple():
    evals = _evals_reaching(40, 192)
    cum = torch.cumsum(evals, 0) / evals.sum()
    assert cum[38] < 0.6 <= cum[39]  # 60% reached at k = 40
    assert select_k(evals, 0.6, 1) == 40
    assert select_k(evals, 0.6, 32) == 64
    assert select_k(evals, 0.6, 8) == 40
    assert select_k(evals, 0.6, 64) == 64


def test_select_k_is_capped_at_the_dimension():
    evals = torch.linspace(2.0, 1.0, 48, dtype=torch.float64)
    assert select_k(evals, 0.99, 32) == 48  # 47 -> 64 -> capped at C = 48
    assert select_k(evals, 1.0, 1) == 48
    # exactly reaching the ratio counts (first k with share >= ratio)
    assert select_k(torch.tensor([3.0, 1.0]), 0.75, 1) == 1
    assert select_k(torch.zeros(10), 0.6, 32) == 10  # degenerate: min(32, C)


def test_paper_examples_shape():
    # Swin-T 768 -> 256, DeiT-T 192 -> 64: k explaining 60% somewhere in
    # (224, 256] resp. (32, 64]
    assert select_k(_evals_reaching(230, 768), 0.6, 32) == 256
    assert select_k(_evals_reaching(50, 192), 0.6, 32) == 64


def test_streaming_pca_equals_eigh_of_the_full_covariance():
    g = torch.Generator().manual_seed(0)
    c, n = 24, 600
    mix = torch.randn(c, c, generator=g) * torch.logspace(0, -2, c)
    x = torch.randn(n, c, generator=g) @ mix.t() + 3.0
    acc = PCAAccumulator(c)
    for chunk in x.split(37):  # uneven batches
        acc.update(chunk)
    acc.all_reduce()  # no process group: a no-op
    assert acc.n == n
    mean, comps, share = acc.basis(1.0, 1)
    xd = x.double()
    torch.testing.assert_close(mean, xd.mean(0).float(), rtol=0, atol=1e-5)
    cov = torch.cov(xd.t(), correction=0)
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    assert comps.shape == (c, c)
    # same eigenvectors up to sign
    signs = torch.sign((comps.double() * evecs).sum(0))
    torch.testing.assert_close(comps.double() * signs, evecs, rtol=0,
                               atol=1e-4)
    assert share == pytest.approx(1.0)
    # a 60% basis: the leading k of the same eigenvectors
    _, comps60, share60 = acc.basis(0.6, 4)
    k = select_k(evals.clamp_min(0), 0.6, 4)
    assert comps60.shape == (c, k)
    torch.testing.assert_close(comps60, comps[:, :k])
    assert share60 == pytest.approx(float(evals[:k].sum() / evals.sum()),
                                    rel=1e-6)
    assert share60 >= 0.6


def test_pca_needs_two_samples():
    acc = PCAAccumulator(4)
    acc.update(torch.randn(1, 4))
    with pytest.raises(ValueError, match='mimic.num_batches'):
        acc.basis(0.6, 32)


def test_loss_is_the_hand_formula():
    g = torch.Generator().manual_seed(1)
    b, c, k = 5, 16, 4
    fs = torch.randn(b, c, generator=g, requires_grad=True)
    ft = torch.randn(b, c, generator=g, requires_grad=True)
    mu = torch.randn(c, generator=g)
    v, _ = torch.linalg.qr(torch.randn(c, k, generator=g))
    loss = mimic_loss(fs, ft, mu, v)
    by_hand = sum(
        sum(float(((fs[i] - mu) @ v[:, j] - (ft[i] - mu) @ v[:, j])**2)
            for j in range(k)) for i in range(b)) / b
    assert float(loss) == pytest.approx(by_hand, rel=1e-5)
    loss.backward()
    assert ft.grad is None  # the teacher gets no gradient
    # d/dfs = 2/B (fs - ft) V V^T
    expected = 2.0 / b * ((fs - ft) @ v @ v.t()).detach()
    torch.testing.assert_close(fs.grad, expected)


def test_pool_feature_layouts():
    x4 = torch.randn(2, 8, 3, 3)
    assert torch.equal(pool_feature((torch.randn(2, 4, 5, 5), x4)),
                       x4.mean(dim=(2, 3)))
    tok = torch.randn(2, 7, 8)
    torch.testing.assert_close(pool_feature(tok), tok.mean(1))
    cls_tok, dist_tok = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(pool_feature(((cls_tok, dist_tok), )),
                               (cls_tok + dist_tok) / 2)


@pytest.mark.parametrize('kw,match', [
    (dict(feature='head'), 'mimic.feature'),
    (dict(var_ratio=0.0), 'var_ratio'),
    (dict(var_ratio=1.5), 'var_ratio'),
    (dict(multiple=0), 'multiple'),
    (dict(weight=-1.0), 'weight'),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        MimicConfig(**kw)
