"""The one exception type for user mistakes and bad input.

Commands catch :class:`BevctlError` at the CLI boundary and print its message as one line
(``error: ...``) with exit code 2; anything else is a bug and keeps its traceback.
"""


class BevctlError(Exception):
    """A user-facing error: bad input, missing file, incompatible store. One clear line."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line. A BevctlError raised in a DataLoader worker comes
    back from torch with the worker's traceback inside its message ("Caught BevctlError in
    DataLoader worker process 0. Original Traceback ..."): keep only the original message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        for line in reversed(text.splitlines()):
            if line.startswith("bevctl.") and ": " in line:
                text = line.split(": ", 1)[1]
                break
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
