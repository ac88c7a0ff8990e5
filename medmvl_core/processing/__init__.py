"""Chat templates, tokenization, label masking, placeholder expansion and batching.

``MedMVLProcessor`` is the one entry point used by training, inference, evaluation and the
worker; ``get_template`` / ``TEMPLATES`` expose MedM-VL's conversation templates.
Box formats live in :mod:`medmvl_core.processing.boxes`.
"""

from medmvl_core.processing.constants import (
    IGNORE_INDEX,
    IMAGE3D_PLACEHOLDER,
    IMAGE3D_TOKEN_INDEX,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
)
from medmvl_core.processing.conversation import (
    check_placeholders,
    count_placeholders,
    multiturn_questions,
    split_inference_item,
    validate_conversation,
    validate_item,
)
from medmvl_core.processing.processor import MedMVLProcessor, apply_medmvl_tokenizer_rules
from medmvl_core.processing.templates import (
    TEMPLATES,
    ChatTemplate,
    EncodedText,
    get_template,
    register_template,
    tokenize_with_placeholders,
)

__all__ = [
    "IGNORE_INDEX",
    "IMAGE3D_PLACEHOLDER",
    "IMAGE3D_TOKEN_INDEX",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN_INDEX",
    "TEMPLATES",
    "ChatTemplate",
    "EncodedText",
    "MedMVLProcessor",
    "apply_medmvl_tokenizer_rules",
    "check_placeholders",
    "count_placeholders",
    "get_template",
    "multiturn_questions",
    "register_template",
    "split_inference_item",
    "tokenize_with_placeholders",
    "validate_conversation",
    "validate_item",
]
