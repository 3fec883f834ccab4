"""Our kernels inside Hugging Face transformers models: :func:`patch_model`.

:mod:`.decoder_layers` holds the decoder-layer and attention forwards it swaps in, :mod:`.layers` the packed q/k/v
projection (:class:`PackedQKVLinear`) its attentions run as one GEMM, :mod:`.attention_backend` the
``"triton_ops"`` attention implementation (``decode_attention`` behind transformers' attention interface),
:mod:`.experts_backend` the ``"triton_ops"`` experts implementation (``fused_moe.moe_experts`` behind its experts
interface).
"""

from .attention_backend import ATTENTION_NAME, register_attention_backend
from .experts_backend import EXPERTS_NAME, register_experts_backend
from .layers import PackedQKVLinear
from .patch import SUPPORTED_MODEL_TYPES, PatchSummary, UnsupportedModelError, patch_model

__all__ = ["ATTENTION_NAME", "EXPERTS_NAME", "SUPPORTED_MODEL_TYPES", "PackedQKVLinear", "PatchSummary",
           "UnsupportedModelError", "patch_model", "register_attention_backend", "register_experts_backend"]
