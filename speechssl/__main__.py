"""``python -m speechssl`` (and ``torchrun -m speechssl``) is the ``speechssl`` command."""

import sys

from speechssl.cli import main

if __name__ == "__main__":
    sys.exit(main())
