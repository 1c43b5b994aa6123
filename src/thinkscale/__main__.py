"""`python -m thinkscale ...` is the `thinkscale` command."""
from thinkscale.cli import run

run()
