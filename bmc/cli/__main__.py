"""``python -m bmc.cli``: the same front door as the ``bmc`` script."""

import sys

from bmc.cli import main

sys.exit(main())
