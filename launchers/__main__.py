"""``python -m launchers`` is ``comfycluster-launch``."""

import sys

from .cli import main

sys.exit(main())
