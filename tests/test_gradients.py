import pytest
import torch

from bvpo.gradients import GradientVector, mixed_variance


def params_with_grads(seed: int, grads_seed: int):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(300, 200)), torch.nn.Parameter(torch.zeros(5000)),
              torch.nn.Parameter(torch.zeros(64, 64))]
    gen = torch.Generator().manual_seed(grads_seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def test_full_vector_is_the_concatenated_gradient():
    params = params_with_grads(0, 1)
    vector = GradientVector(params)()
    assert vector.shape == (300 * 200 + 5000 + 64 * 64,)
    assert torch.equal(vector, torch.cat([p.grad.flatten() for p in params]))


def test_sketch_preserves_norms_and_inner_products():
    params = params_with_grads(0, 1)
    x_full = GradientVector(params)()
    x = GradientVector(params, sketch_dim=8192, seed=3)()
    for p in params:  # a second gradient, correlated with the first
        p.grad = 0.6 * p.grad + 0.8 * torch.randn_like(p.grad)
    y_full = GradientVector(params)()
    y = GradientVector(params, sketch_dim=8192, seed=3)()
    assert x.shape == (8192,)
    assert (x.norm() / x_full.norm()).item() == pytest.approx(1.0, abs=0.03)
    cos_full = torch.nn.functional.cosine_similarity(x_full, y_full, dim=0).item()
    cos_sketch = torch.nn.functional.cosine_similarity(x, y, dim=0).item()
    assert cos_sketch == pytest.approx(cos_full, abs=0.03)


def test_sketch_is_deterministic_per_seed():
    params = params_with_grads(0, 1)
    a = GradientVector(params, sketch_dim=512, seed=7)()
    b = GradientVector(params, sketch_dim=512, seed=7)()
    c = GradientVector(params, sketch_dim=512, seed=8)()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cached_hashes_give_the_sketch_of_the_current_gradient(monkeypatch):
    """A small model keeps its coordinates' hashes between calls; a large one rehashes. Both
    sketch whatever .grad holds now: every call, cached or not, equals a fresh object's."""
    import bvpo.gradients as gradients

    params = params_with_grads(0, 1)
    cached = GradientVector(params, sketch_dim=512, seed=7)
    monkeypatch.setattr(gradients, "_CACHE_COORDINATES", 1000)
    rehashed = GradientVector(params, sketch_dim=512, seed=7)
    assert cached.cached and not rehashed.cached
    for _ in range(2):
        fresh = GradientVector(params, sketch_dim=512, seed=7)._sketch()
        assert torch.equal(cached(), fresh) and torch.equal(rehashed(), fresh)
        for p in params:
            p.grad = torch.randn_like(p)
    assert len(cached._hashes) == 3 and not rehashed._hashes


def test_mixed_variance_of_independent_draws():
    gen = torch.Generator().manual_seed(0)
    trace = 2.0 * torch.randn(20000, 3, generator=gen, dtype=torch.float64)
    empty = 0.5 * torch.randn(20000, 3, generator=gen, dtype=torch.float64)
    # α²·tr Σ_t + (1−α)²·tr Σ_e = 0.09·12 + 0.49·0.75
    assert mixed_variance(trace, empty, 0.3) == pytest.approx(0.09 * 12 + 0.49 * 0.75, rel=0.03)
