"""Typed errors shared by the library, the CLI and the worker.

Every error says what is wrong and what to do. ``code`` is a stable machine-readable string
the worker returns in its HTTP error bodies. This module must not import torch.
"""

from __future__ import annotations


class MedMVLError(Exception):
    """Base class. ``code`` is stable; the message is for people."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class ConfigError(MedMVLError, ValueError):
    code = "bad_config"


class CheckpointError(MedMVLError):
    code = "bad_checkpoint"


class MissingBaseModelError(CheckpointError):
    code = "missing_base_model"


class RegistryError(MedMVLError, KeyError):
    code = "unknown_name"

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0] if self.args else ""


class ImageReadError(MedMVLError):
    code = "unreadable_image"


class InvalidImageError(MedMVLError, ValueError):
    code = "invalid_image"


class RoiError(MedMVLError, ValueError):
    code = "bad_roi"


class PlaceholderError(MedMVLError, ValueError):
    code = "placeholder_mismatch"


class TokenizationMismatchError(MedMVLError, ValueError):
    code = "tokenization_mismatch"


class DataError(MedMVLError, ValueError):
    code = "bad_data"


class SequenceTooLongError(MedMVLError, ValueError):
    """Truncating to the maximum length would cut through (or drop) an image placeholder run."""

    code = "sequence_too_long"


class BoxParseError(MedMVLError, ValueError):
    code = "bad_box"
