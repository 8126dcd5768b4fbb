"""`python -m bpcp`: the same as the `bpcp` command."""
import sys

from bpcp.cli import main

sys.exit(main())
