"""Special ids and placeholder strings, the same values as MedM-VL (``lvlm/utils/constants.py``).

The negative ids never reach the LLM's embedding table: the processor expands each placeholder
into ``N`` copies of its id and the model scatters the image features into those positions.
"""

from __future__ import annotations

IGNORE_INDEX = -100
"""Label value that the loss ignores (transformers' ``CrossEntropyLoss`` default)."""

IMAGE_TOKEN_INDEX = -200
"""Sentinel id of a 2D image (``<image>``)."""

IMAGE3D_TOKEN_INDEX = -201
"""Sentinel id of a 3D volume (``<image3d>``)."""

IMAGE_PLACEHOLDER = "<image>"
IMAGE3D_PLACEHOLDER = "<image3d>"

PLACEHOLDER_IDS: dict[str, int] = {
    IMAGE_PLACEHOLDER: IMAGE_TOKEN_INDEX,
    IMAGE3D_PLACEHOLDER: IMAGE3D_TOKEN_INDEX,
}
"""Placeholder string -> sentinel id (MedM-VL's ``special_token_dict``; its order matters for the split regex)."""

KIND_TO_PLACEHOLDER: dict[str, str] = {"image": IMAGE_PLACEHOLDER, "image3d": IMAGE3D_PLACEHOLDER}
KIND_TO_ID: dict[str, int] = {"image": IMAGE_TOKEN_INDEX, "image3d": IMAGE3D_TOKEN_INDEX}
ID_TO_KIND: dict[int, str] = {v: k for k, v in KIND_TO_ID.items()}

HUMAN = "human"
GPT = "gpt"
