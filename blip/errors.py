"""How the command line and the entry scripts report a bad input: one line `error: ...` on stderr, exit status 2;
the traceback only with --debug. A program error (anything else) keeps its traceback."""
from __future__ import annotations

import sys


class OutputExistsError(ValueError):
    """An output that holds earlier work was not asked to be replaced (refused rather than overwritten)."""


def user_errors() -> tuple[type, ...]:
    """The exceptions bad input raises: a missing file, a bad value or key, a checkpoint that does not fit."""
    from .models.checkpoint import CheckpointMismatchError
    from .data.datasets import NoReadableImage, UnreadableEvalImages
    return (FileNotFoundError, ValueError, TypeError, KeyError, ImportError, CheckpointMismatchError,
            UnreadableEvalImages, NoReadableImage)


def one_line(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # a KeyError's str() adds quotes
    if "\nOriginal Traceback" in str(text):  # raised in a DataLoader worker: torch wraps the worker's traceback
        last = str(text).strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last  # "module.Error: message" -> message
    return f"error: {text}"


def exit_on_user_error(main, argv=None):
    """Run an entry script's `main(argv)`; a user error becomes one line and exit status 2 (--debug: raise)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except user_errors() as e:
        if "--debug" in args:
            raise
        print(one_line(e), file=sys.stderr)
        sys.exit(2)
