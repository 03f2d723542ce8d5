"""The one user-facing exception type (cli.py prints it as one red line on stderr and exits 2), and the one way
lcmtool prints a line for people on stderr."""


class LcmError(Exception):
    """A problem with the user's input (file, config, number): told in one line, exit code 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def to_stderr(msg: str, tag: str = "") -> None:
    """`msg` as one line on stderr, printed as text: paths, prompts and values like [sd, zz] appear as they are
    (rich would read brackets as markup). `tag`: a rich-markup prefix such as "[bold red]error:[/]"."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"{tag} {escape(msg)}" if tag else escape(msg))
