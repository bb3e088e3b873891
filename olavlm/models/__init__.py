# olavlm.models: the OLA-VLM model and its parts.
"""The model (``OlaVLM``, ``ModelConfig``) and its parts; checkpoint import/export lives in
``olavlm.models.checkpoint_io``. See docs/model.md."""
from .config import HeadConfig, ModelConfig
from .ola import OlaOutput, OlaVLM
from .vision import (
    VISION_TOWERS,
    ClipVisionTower,
    ConvNextVisionTower,
    SiglipVisionTower,
    VisionTower,
    build_tiny_vision_tower,
    build_vision_tower,
    tower_kind,
)

__all__ = [
    "HeadConfig",
    "ModelConfig",
    "OlaOutput",
    "OlaVLM",
    "VISION_TOWERS",
    "ClipVisionTower",
    "ConvNextVisionTower",
    "SiglipVisionTower",
    "VisionTower",
    "build_tiny_vision_tower",
    "build_vision_tower",
    "tower_kind",
]
