"""Entry point: ``python -m spiral_lit``; bad input is printed without a traceback (:mod:`spiral_lit.errors`)."""

from spiral_lit.cli import main
from spiral_lit.errors import run_main

if __name__ == "__main__":
    run_main(main)
