"""``python -m launchers`` is ``comfycluster-launch``."""

import sys

from launchers.cli import main

sys.exit(main())
