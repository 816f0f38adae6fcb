"""``python -m flashckpt`` is the ``flashckpt`` command."""

import sys

from .cli import main

sys.exit(main())
