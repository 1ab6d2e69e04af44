"""`python -m speckv` is the `speckv` command."""

import sys

from speckv.cli import main

sys.exit(main())
