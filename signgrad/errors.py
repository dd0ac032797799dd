"""The one exception type for a user's mistake.

Anything raised as ``SigngradError`` is reported by the command line as a single line
(``signgrad: error: ...``) with a non-zero exit; any other exception is a bug and keeps
its traceback.
"""


class SigngradError(Exception):
    """A problem with the user's input (a name, a file, a shape, a flag), not a bug."""


def first_line(e: BaseException) -> str:
    """The cause of ``e`` on one line, for a :class:`SigngradError` message: its first
    line, and the second where the first only introduces it ("Error(s) in loading
    state_dict for ConvNet:"), cut to a readable size."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= 300 else text[:297] + "..."
