"""The one exception type for user mistakes and bad input.

Commands catch :class:`BevctlError` at the CLI boundary and print its message as one line
(``error: ...``) with exit code 2; anything else is a bug and keeps its traceback.
"""


class BevctlError(Exception):
    """A user-facing error: bad input, missing file, incompatible store. One clear line."""
