"""The one user-facing exception type. cli.py prints it as one red line on stderr and exits 2."""


class LcmError(Exception):
    """A problem with the user's input (file, config, number): told in one line, exit code 2."""
