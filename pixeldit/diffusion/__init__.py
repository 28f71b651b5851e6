from .flow import FlowDraws, RectifiedFlow, repa_loss, shift_time, velocity_loss
from .randomness import sample_generators, stream_seed
from .samplers import SAMPLERS, GuidedVelocity, SampleResult, integrate, sample, timestep_grid, to_uint8

__all__ = [
    "FlowDraws", "RectifiedFlow", "repa_loss", "shift_time", "velocity_loss", "sample_generators", "stream_seed",
    "SAMPLERS", "GuidedVelocity", "SampleResult", "integrate", "sample", "timestep_grid", "to_uint8",
]
