"""The one exception type users see.

Anything raised as :class:`LongkdError` is a problem with the user's input or files, not a
bug: the command line prints its message on one line and exits with status 2, without a
traceback. Messages name the thing that is wrong and what to do about it.
"""


class LongkdError(Exception):
    """A user-facing error with a one-line message."""
