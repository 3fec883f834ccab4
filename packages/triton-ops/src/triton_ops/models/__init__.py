"""Our kernels inside Hugging Face transformers models: :func:`patch_model`."""

from .patch import SUPPORTED_MODEL_TYPES, PatchSummary, UnsupportedModelError, patch_model

__all__ = ["SUPPORTED_MODEL_TYPES", "PatchSummary", "UnsupportedModelError", "patch_model"]
