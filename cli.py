#!/usr/bin/env python3
"""``python cli.py ...`` runs the mtl command line (installed as ``mtl`` too)."""

import sys

from mtl.cli import main

if __name__ == "__main__":
    sys.exit(main())
