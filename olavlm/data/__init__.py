# olavlm.data: LLaVA conversations, templates and labels, image views, synthetic data, loader.
"""Data for OLA-VLM training (SPEC sections 1.3, 1.4, 3 and 5.2); see docs/data.md."""
from .bad_data import (
    BAD_SAMPLE_POLICIES,
    REJECT_REASONS,
    TARGET_PROBLEMS,
    BadSampleError,
    Reject,
    RejectLog,
)
from .images import CLIP_MEAN, CLIP_STD, ImageView, image_digest, load_image, tower_view
from .llava import MISSING_TARGET_POLICIES, LlavaDataset, LlavaIndex, Sample, image_key
from .loader import Batch, Collator, ResumableLoader
from .sampler import plan_epoch
from .templates import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
    SEED_NUM_TOKENS_BEFORE_IMAGE,
    TEMPLATES,
    ConversationError,
    Template,
    get_template,
    num_tokens_before_image,
    render,
    tokenize_conversation,
)

__all__ = [
    "BAD_SAMPLE_POLICIES",
    "CLIP_MEAN",
    "CLIP_STD",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN_INDEX",
    "MISSING_TARGET_POLICIES",
    "REJECT_REASONS",
    "SEED_NUM_TOKENS_BEFORE_IMAGE",
    "TARGET_PROBLEMS",
    "TEMPLATES",
    "BadSampleError",
    "Batch",
    "Collator",
    "ConversationError",
    "ImageView",
    "LlavaDataset",
    "LlavaIndex",
    "Reject",
    "RejectLog",
    "ResumableLoader",
    "Sample",
    "Template",
    "get_template",
    "image_digest",
    "image_key",
    "load_image",
    "num_tokens_before_image",
    "plan_epoch",
    "render",
    "tokenize_conversation",
    "tower_view",
]
