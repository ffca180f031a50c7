"""``python -m gradwatch ...``: the ``gradwatch`` command (``torchrun -m gradwatch run ...``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
