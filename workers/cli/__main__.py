"""``python -m workers.cli``: the ``omniq`` command."""

import sys

from workers.cli import main

sys.exit(main())
