"""Input validation building blocks shared by every kernel package: dtype, device, shape and stride checks that
raise the named exceptions of ``triton_ops_core.exceptions``. Each op's own validator lives with the op, in its
package."""

from .common import *  # noqa: F401,F403
from .common import __all__ as _common_all

__all__ = [*_common_all]
