"""Errors the user can fix. Interfaces print the message as one line and exit with code 2."""


class OMLInputError(ValueError):
    """Bad input from the user: the message names the problem and the fix, never a secret."""


class Cancelled(Exception):
    """Long work stopped by SIGTERM/SIGINT at a safe point; what it was making stays incomplete
    (interfaces exit with 143)."""
