"""`python -m convert SRC DST ...`. Importable: `internvl-jax` calls `convert_main` / `export_main` from here."""

import sys

from convert.cli import convert_main, export_main

__all__ = ["convert_main", "export_main"]

if __name__ == "__main__":
    sys.exit(convert_main(sys.argv[1:]))
