"""`python -m pidkern ...` runs the same command line as the `pidkern` script."""
import sys

from .cli import main

sys.exit(main())
