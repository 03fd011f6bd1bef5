"""The error a user can fix: ``InputError`` (a path, a value, a recipe field, an output that
may not be written). The ``slimlm`` command prints it as one line and exits with code 2; any
other exception, a plain ValueError included, is a runtime failure (exit 1). So a function that
checks what the user gave raises InputError, or its caller turns the ValueError into one."""


class InputError(ValueError):
    """Bad input from the user (a path, a value, a recipe field): exit code 2. A ValueError, so
    that Python callers catching ValueError for bad arguments keep working."""
