import math

import pytest
import torch

from pixeldit.diffusion import RectifiedFlow, shift_time, velocity_loss


def test_draws_do_not_depend_on_how_the_batch_is_split():
    flow = RectifiedFlow(num_classes=10)
    whole = flow.draw(seed=3, step=7, sample_indices=range(8), image_shape=(3, 4, 4))
    parts = [flow.draw(seed=3, step=7, sample_indices=idx, image_shape=(3, 4, 4)) for idx in ([0, 1, 2], [3, 4, 5, 6, 7])]
    assert torch.equal(whole.t, torch.cat([p.t for p in parts]))
    assert torch.equal(whole.noise, torch.cat([p.noise for p in parts]))
    assert torch.equal(whole.drop, torch.cat([p.drop for p in parts]))
    # and they do change with the step, the seed and the sample index
    assert not torch.equal(whole.noise, flow.draw(3, 8, range(8), (3, 4, 4)).noise)
    assert not torch.equal(whole.noise, flow.draw(4, 7, range(8), (3, 4, 4)).noise)
    assert not torch.equal(whole.noise[1], whole.noise[0])


def test_t_is_logit_normal():
    flow = RectifiedFlow(num_classes=10)
    t = flow.draw(seed=0, step=0, sample_indices=range(4000), image_shape=(1,)).t.double()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.06
    assert abs(logit.std().item() - 1.0) < 0.05
    assert 0 < t.min() and t.max() < 1
    shifted = RectifiedFlow(num_classes=10, time_shift=3.0).draw(0, 0, range(4000), (1,)).t.double()
    assert torch.allclose(shifted, t / (t + (1 - t) * 3.0), atol=1e-6)
    assert shifted.median() < t.median()  # shift > 1 spends more steps near noise


def test_time_shift_formula():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)
    expected = torch.tensor([0.0, 0.25 / (0.25 + 0.75 * 3), 0.5 / (0.5 + 0.5 * 3), 1.0], dtype=torch.float64)
    assert torch.allclose(shift_time(t, 3.0), expected)


def test_label_drop_rate_and_null_class():
    flow = RectifiedFlow(num_classes=10, label_drop=0.1)
    draws = flow.draw(seed=1, step=0, sample_indices=range(5000), image_shape=(1,))
    rate = draws.drop.double().mean().item()
    assert abs(rate - 0.1) < 3 * math.sqrt(0.1 * 0.9 / 5000)
    x = torch.zeros(5000, 1)
    y = torch.arange(5000) % 10
    _, _, y_in, _ = flow.training_inputs(x, y, draws)
    assert torch.equal(y_in[draws.drop], torch.full((int(draws.drop.sum()),), 10))
    assert torch.equal(y_in[~draws.drop], y[~draws.drop])
    assert not RectifiedFlow(num_classes=10, label_drop=0.0).draw(1, 0, range(500), (1,)).drop.any()


def test_interpolation_convention():
    flow = RectifiedFlow(num_classes=10)
    x = torch.randn(3, 3, 4, 4)
    noise = torch.randn(3, 3, 4, 4)
    t = torch.tensor([0.0, 0.3, 1.0])
    x_t = flow.interpolate(x, noise, t)
    assert torch.equal(x_t[0], noise[0])          # t = 0 is pure noise
    assert torch.equal(x_t[2], x[2])              # t = 1 is data
    assert torch.allclose(x_t[1], 0.3 * x[1] + 0.7 * noise[1])
    # the target velocity is the time derivative of the path
    eps = 1e-3
    dt = (flow.interpolate(x, noise, t + eps) - flow.interpolate(x, noise, t)) / eps
    assert torch.allclose(dt, flow.velocity(x, noise), atol=1e-3)


def test_velocity_loss_reductions():
    pred, target = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    per_sample = velocity_loss(pred, target, "none")
    assert per_sample.shape == (4,)
    assert torch.allclose(velocity_loss(pred, target), ((pred - target) ** 2).mean())
    assert torch.allclose(per_sample.mean(), velocity_loss(pred, target))
    with pytest.raises(ValueError, match="reduction='sum'"):
        velocity_loss(pred, target, "sum")
