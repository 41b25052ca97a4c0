"""The one exception type for user mistakes.

Anything a user can get wrong (a path, a key, a value, a file's contents) raises
:class:`OreError` with a one-line message that names the file, key or value and says
what was expected. The command line prints it as ``error: <message>`` and exits with
status 2, never with a traceback. Programming errors keep their ordinary exceptions.
"""

from __future__ import annotations


class OreError(Exception):
    """A user-facing error with a one-line message."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep the message on one line whatever the caller passed.
        super().__init__(" ".join(str(message).split()))
