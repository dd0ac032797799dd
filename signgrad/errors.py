"""The one exception type for a user's mistake.

Anything raised as ``SigngradError`` is reported by the command line as a single line
(``signgrad: error: ...``) with a non-zero exit; any other exception is a bug and keeps
its traceback.
"""


class SigngradError(Exception):
    """A problem with the user's input (a name, a file, a shape, a flag), not a bug."""
