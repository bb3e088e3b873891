# olavlm.teachers: frozen target encoders (batched, on device), online targets, the target cache.
"""Teachers and their targets (SPEC section 3); see docs/teachers.md."""
from .base import Teacher, TeacherWeightsNotFound, device_view
from .cache import STORAGES, CorruptTargetError, TargetCache
from .depth import DepthTeacher
from .extract import ExtractReport, extract_targets
from .gen import GenTeacher
from .online import OnlineTargets, PendingTargets, TeacherTargets
from .quantize import FP8_REL_ERROR, FP8_SUBNORMAL_ERROR, dequantize_fp8, quantize_fp8
from .registry import (
    DEFAULT_WEIGHTS,
    TEACHERS,
    build_teacher,
    build_teachers,
    parse_dtypes,
    parse_weights,
    register_teacher,
)
from .seg import SegTeacher
from .synthetic import SyntheticTeacher
from .verify import VerifyReport, verify_cache

__all__ = [
    "DEFAULT_WEIGHTS",
    "FP8_REL_ERROR",
    "FP8_SUBNORMAL_ERROR",
    "STORAGES",
    "TEACHERS",
    "CorruptTargetError",
    "DepthTeacher",
    "ExtractReport",
    "GenTeacher",
    "OnlineTargets",
    "PendingTargets",
    "SegTeacher",
    "SyntheticTeacher",
    "TargetCache",
    "Teacher",
    "TeacherTargets",
    "TeacherWeightsNotFound",
    "VerifyReport",
    "build_teacher",
    "build_teachers",
    "dequantize_fp8",
    "device_view",
    "extract_targets",
    "parse_dtypes",
    "parse_weights",
    "quantize_fp8",
    "register_teacher",
    "verify_cache",
]
