"""Entry point: ``python -m spiral_lit``."""

from spiral_lit.cli import main

if __name__ == "__main__":
    main()
