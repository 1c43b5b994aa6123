"""`python -m thinkscale ...` is the `thinkscale` command."""
import sys

from thinkscale.cli import main

sys.exit(main())
