"""``python -m mcs`` is the ``mcs`` command."""

import sys

from mcs.cli import main

sys.exit(main())
