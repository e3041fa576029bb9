"""``python -m cggr bench ...``: the same entry point as the ``cggr`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
