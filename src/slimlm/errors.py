"""The error a user can fix: ``InputError`` (a path, a value, a recipe field, an output that
may not be written). The ``slimlm`` command prints it as one line and exits with code 2."""


class InputError(ValueError):
    """Bad input from the user (a path, a value, a recipe field): exit code 2."""
