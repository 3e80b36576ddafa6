"""Entry point: ``python -m spiral_lit`` (also the ``spiral-lit`` command); bad input is printed without a traceback
(:mod:`spiral_lit.errors`)."""

from spiral_lit.cli import console_main

if __name__ == "__main__":
    console_main()
