"""``python -m flower_privacy.cli``."""

import sys

from flower_privacy.cli import main

sys.exit(main())
