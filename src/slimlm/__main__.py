"""``python -m slimlm``: the slimlm command (also what ``accelerate launch -m slimlm distill`` runs)."""
import sys

from slimlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
