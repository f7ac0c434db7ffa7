"""`python -m ragrt` is the `ragrt` command."""
import sys

from ragrt.cli import main

sys.exit(main())
