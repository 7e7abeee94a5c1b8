"""``python -m vitamin``: the same command line as the ``vitamin`` script."""

import sys

from .cli import main

sys.exit(main())
