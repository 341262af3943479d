"""``python -m execmem`` is the ``execmem`` command."""

import sys

from execmem.cli import main

sys.exit(main())
