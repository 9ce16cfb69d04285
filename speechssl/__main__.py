"""``python -m speechssl`` (and ``torchrun -m speechssl ...``) is the ``speechssl`` command."""

from speechssl.cli import entry

if __name__ == "__main__":
    entry()
