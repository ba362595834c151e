"""``python -m normkit``: see :mod:`normkit.cli`."""

import sys

from .cli import main

sys.exit(main())
