"""Input validation: reusable checks and one validator per kernel family."""

from .common import *  # noqa: F401,F403
from .common import __all__ as _common_all
from .fp8_gemm import *  # noqa: F401,F403
from .fp8_gemm import __all__ as _fp8_all
from .gated_mlp import *  # noqa: F401,F403
from .gated_mlp import __all__ as _mlp_all
from .rmsnorm_rope import *  # noqa: F401,F403
from .rmsnorm_rope import __all__ as _rope_all

__all__ = [*_common_all, *_fp8_all, *_mlp_all, *_rope_all]
