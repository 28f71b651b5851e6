import math
from fractions import Fraction

import pytest
import torch

from pixeldit.diffusion import GuidedVelocity, integrate, sample, timestep_grid, to_uint8
from pixeldit.diffusion.samplers import initial_noise
from pixeldit.models import build_model


def test_timestep_grid_is_the_reference_grid():
    grid = timestep_grid(4)
    assert grid.dtype == torch.float64
    assert grid.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    shifted = timestep_grid(4, time_shift=3.0)
    assert torch.allclose(shifted, grid / (grid + (1 - grid) * 3.0))
    assert shifted[0] == 0 and shifted[-1] == 1
    with pytest.raises(ValueError, match="steps=0"):
        timestep_grid(0)


@pytest.mark.parametrize("sampler", ["euler", "ab2", "heun"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_exact_velocity_of_a_linear_path_reaches_the_target(sampler, shift):
    target = torch.randn(5, 3, 4, 4, dtype=torch.float64)

    def velocity(x, t):  # the straight path from wherever x is to `target`, arriving at t = 1
        return (target - x) / (1.0 - t) if t < 1 else torch.zeros_like(x)

    x0 = torch.randn_like(target)
    out = integrate(velocity, x0, sampler=sampler, steps=10, time_shift=shift)
    assert torch.allclose(out, target, atol=1e-5)


def _toy_error(sampler, steps):
    # dx/dt = -x·cos(t): x(1) = x(0)·exp(-sin 1)
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    out = integrate(lambda x, t: -x * math.cos(t), x0, sampler=sampler, steps=steps)
    return (out - x0 * math.exp(-math.sin(1.0))).abs().max().item()


@pytest.mark.parametrize("sampler, order", [("euler", 1), ("heun", 2), ("ab2", 2)])
def test_convergence_order_on_a_toy_ode(sampler, order):
    errors = [_toy_error(sampler, n) for n in (20, 40, 80)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(r - order) < 0.15 for r in rates), (errors, rates)


def test_sde_sampler_recovers_a_gaussian_data_distribution():
    mu, sigma = 0.7, 0.3

    def exact_velocity(x, t):
        # E[x − ε | x_t] for x ~ N(mu, sigma²), ε ~ N(0, 1), x_t = t·x + (1 − t)·ε
        var = t * t * sigma ** 2 + (1 - t) ** 2
        return mu + (t * sigma ** 2 - (1 - t)) / var * (x - t * mu)

    n = 1500
    x0 = initial_noise(seed=0, image_indices=range(n), shape=(1,)).double()
    for sampler in ("sde", "ab2"):
        out = integrate(exact_velocity, x0, sampler=sampler, steps=50, seed=1, image_indices=range(n))
        assert abs(out.mean().item() - mu) < 4 * sigma / math.sqrt(n), sampler
        assert abs(out.std().item() - sigma) < 0.03, sampler
    # the SDE is stochastic: another seed moves individual samples
    other = integrate(exact_velocity, x0, sampler="sde", steps=20, seed=2, image_indices=range(n))
    first = integrate(exact_velocity, x0, sampler="sde", steps=20, seed=1, image_indices=range(n))
    assert not torch.allclose(other, first)


class CountingModel:
    """Returns a velocity that depends on the label, and records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((float(t[0]), x.shape[0]))
        return torch.ones_like(x) * y.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)


def test_cfg_formula_and_strict_interval():
    model = CountingModel()
    guided = GuidedVelocity(model, torch.tensor([2, 3]), null_class=10, cfg_scale=3.0, cfg_interval=(0.1, 0.9))
    x = torch.zeros(2, 1)
    v = guided(x, 0.5)  # v_u = 10, v_c = y: 10 + 3·(y − 10)
    assert torch.equal(v, torch.tensor([[10 + 3 * (2 - 10.0)], [10 + 3 * (3 - 10.0)]]))
    for t in (0.1, 0.9, 0.05, 1.0):  # boundaries are outside: the conditional velocity alone
        assert torch.equal(guided(x, t), torch.tensor([[2.0], [3.0]])), t
    assert [n for _, n in model.calls] == [4, 2, 2, 2, 2]
    assert guided.image_evaluations == 12


def test_cfg_interval_evaluation_count_matches_exact_arithmetic():
    steps, lo, hi = 100, Fraction(1, 10), Fraction(9, 10)
    guided_steps = sum(lo < Fraction(i, steps) < hi for i in range(steps))
    expected = 2 * guided_steps + (steps - guided_steps)
    result = sample(CountingModel(), torch.tensor([1]), [0], (1, 2, 2), null_class=10, sampler="ab2",
                    steps=steps, cfg_scale=2.75, cfg_interval=(0.1, 0.9))
    assert result.image_evaluations == expected == 179


class AlwaysBatchedCFG(GuidedVelocity):
    """The naive form: every step runs [uncond; cond] and picks v_cond outside the interval."""

    def __call__(self, x, t):
        B = x.shape[0]
        self.image_evaluations += 2 * B
        tt = torch.full((2 * B,), t, dtype=torch.float32)
        v_u, v_c = self.model(torch.cat([x, x]), tt, torch.cat([torch.full_like(self.labels, self.null_class),
                                                                  self.labels])).chunk(2)
        return v_u + self.cfg_scale * (v_c - v_u) if self.guided_at(t) else v_c


def _random_tiny_model():
    torch.manual_seed(0)
    model = build_model("pixeldit-tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def test_skipping_the_unconditional_pass_outside_the_interval_gives_the_same_samples():
    model = _random_tiny_model()
    labels = torch.tensor([1, 2, 3])
    shape = (3, 16, 16)
    fast = GuidedVelocity(model, labels, 10, 2.0, (0.3, 0.8))
    naive = AlwaysBatchedCFG(model, labels, 10, 2.0, (0.3, 0.8))
    x0 = initial_noise(0, range(3), shape)
    a = integrate(fast, x0, sampler="ab2", steps=12)
    b = integrate(naive, x0, sampler="ab2", steps=12)
    # batch shape changes CPU kernels, not the maths: fp32 rounding only
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert fast.image_evaluations < naive.image_evaluations


def test_sampling_is_reproducible_and_independent_of_batching():
    model = _random_tiny_model()
    labels = torch.tensor([0, 4, 9, 10, 2])
    kw = dict(image_shape=(3, 16, 16), null_class=10, seed=5, steps=6, cfg_scale=1.5, cfg_interval=(0.1, 0.9))
    whole = sample(model, labels, range(5), **kw).images
    again = sample(model, labels, range(5), **kw).images
    assert torch.equal(whole, again)
    split = torch.cat([sample(model, labels[:2], [0, 1], **kw).images,
                       sample(model, labels[2:], [2, 3, 4], **kw).images])
    assert torch.allclose(whole, split, atol=1e-5)
    # noise itself is bit-identical whatever the batch
    assert torch.equal(initial_noise(5, [3, 4], (3, 16, 16)), initial_noise(5, range(5), (3, 16, 16))[3:])
    sde_whole = sample(model, labels, range(5), sampler="sde", **kw).images
    sde_split = sample(model, labels[3:], [3, 4], sampler="sde", **kw).images
    assert torch.allclose(sde_whole[3:], sde_split, atol=1e-5)


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        integrate(lambda x, t: x, torch.zeros(1), sampler="dpm")


def test_uint8_conversion_is_the_adm_one():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 255]
    assert to_uint8(torch.tensor([-0.0039])).item() == 127 - 0  # (−0.0039 + 1)·127.5 + 0.5 = 127.50
