"""The one user-facing exception type. cli.py prints it as one red line on stderr and exits 2."""


class LcmError(Exception):
    """A problem with the user's input (file, config, number): told in one line, exit code 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
