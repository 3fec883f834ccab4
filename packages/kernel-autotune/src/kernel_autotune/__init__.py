"""kernel_autotune."""

from .__about__ import __version__

__all__ = ["__version__"]
