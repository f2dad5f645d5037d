"""``python -m tinysam.cli`` (what ``torchrun -m tinysam.cli`` runs)."""

import sys

from . import main

sys.exit(main())
