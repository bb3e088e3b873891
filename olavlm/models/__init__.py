# olavlm.models: the OLA-VLM model parts (vision towers so far).
"""Model building blocks; see docs/model.md."""
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
    "VISION_TOWERS",
    "ClipVisionTower",
    "ConvNextVisionTower",
    "SiglipVisionTower",
    "VisionTower",
    "build_tiny_vision_tower",
    "build_vision_tower",
    "tower_kind",
]
