"""`python -m pmod.bench ...`: the bench sub-command without the rest of the CLI."""
import sys

from pmod.bench.cli import main

sys.exit(main())
