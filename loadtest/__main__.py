import sys

from loadtest.cli import main

sys.exit(main(prog="python -m loadtest"))
