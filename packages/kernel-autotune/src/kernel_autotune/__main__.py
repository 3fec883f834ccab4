"""``python -m kernel_autotune``: see ``kernel_autotune.cli``."""

import sys

from .cli import main

sys.exit(main())
