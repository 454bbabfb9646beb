"""``python -m ase_sparsecalc`` runs the ``sparsecalc`` command line."""

import sys

from .cli import main

sys.exit(main())
