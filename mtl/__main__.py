"""``python -m mtl ...`` runs the command line, as ``cli.py`` and the installed ``mtl`` do."""

import sys

from mtl.cli import main

sys.exit(main())
