import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pixeldit.models import build_model, build_projector, forward_flops, resolve_arch, training_flops

PAPER_PARAMS = {"pixeldit-b": 184.75e6, "pixeldit-l": 569.65e6, "pixeldit-xl": 797.38e6}
PAPER_PROJECTOR = {"pixeldit-b": 1.77e6, "pixeldit-l": 2.89e6, "pixeldit-xl": 3.54e6}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(name):
    with torch.device("meta"):
        model = build_model(name)
        projector = build_projector(model.arch.hidden_size, 768)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total / PAPER_PARAMS[name] - 1) < 0.005, total
    assert model.parameter_groups()["total"] == total
    assert abs(sum(p.numel() for p in projector.parameters()) / PAPER_PROJECTOR[name] - 1) < 0.005


def counted_flops(model, batch, height, width, train=False):
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, height, width, device=device, requires_grad=train)
    t = torch.rand(batch, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        v = model(x, t, y)
        if train:
            v.sum().backward()
    return counter.get_total_flops() / batch


@pytest.mark.parametrize("name, overrides, size", [
    ("pixeldit-b", {}, (256, 256)),
    ("pixeldit-xl", {}, (256, 256)),
    ("pixeldit-xl", {}, (512, 512)),
    ("pixeldit-tiny", {"variant": "dit"}, (32, 48)),
    ("pixeldit-tiny", {"pixel_adaln": "patch"}, (32, 32)),
    ("pixeldit-tiny", {"post_modulation": True}, (48, 32)),
])
def test_analytic_forward_flops_match_a_flop_counter(name, overrides, size):
    with torch.device("meta"):
        model = build_model(name, **overrides)
        counted = counted_flops(model, 2, *size)
    analytic = forward_flops(model.arch, *size)["total"]
    assert abs(analytic / counted - 1) < 0.02, (analytic, counted)


def test_training_flops_are_three_forwards():
    with torch.device("meta"):
        model = build_model("pixeldit-b")
        counted = counted_flops(model, 2, 256, 256, train=True)
    assert abs(training_flops(model.arch, 256, 256) / counted - 1) < 0.02


def test_info_prints_the_xl_figures():
    proc = subprocess.run([sys.executable, "-m", "pixeldit", "info", "pixeldit-xl"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "797.38M total" in proc.stdout
    assert "REPA projector 3.54M" in proc.stdout
    flops = forward_flops(resolve_arch("pixeldit-xl"), 256, 256)["total"]
    assert f"forward          {flops / 1e9:.1f} GFLOPs/image" in proc.stdout


def test_info_refuses_unknown_model_and_override():
    proc = subprocess.run([sys.executable, "-m", "pixeldit", "info", "pixeldit-xxl"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown model 'pixeldit-xxl'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pixeldit", "info", "pixeldit-b", "--set", "depth=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown model override(s) ['depth']" in proc.stderr
