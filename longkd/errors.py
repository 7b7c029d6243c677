"""The one exception type users see.

Anything raised as :class:`LongkdError` is a problem with the user's input or files, not a
bug: the command line prints its message on one line and exits with status 2, without a
traceback. Messages name the thing that is wrong and what to do about it.
"""


class LongkdError(Exception):
    """A user-facing error with a one-line message."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """Another library's exception message on one line, cut to ``limit`` characters, for
    quoting inside a :class:`LongkdError` (loaders and cloud SDKs are wordy). An exception
    without a message is named by its type."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
