"""PixelDiT training platform: models, rectified flow, data pipelines, distributed training, evaluation."""

__version__ = "0.1.0"
