"""``python -m slimlm``: the slimlm command (also what ``accelerate launch -m slimlm distill`` runs)."""
from slimlm.cli import entry

if __name__ == "__main__":
    entry()
