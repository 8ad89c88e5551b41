"""``python -m lorax_fn``: see :mod:`lorax_fn.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
