"""`python -m slimtune` is the `slimtune` command."""
import sys

from slimtune.cli import main

sys.exit(main())
