"""``python -m scalesgd`` runs the command-line interface."""

from scalesgd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
