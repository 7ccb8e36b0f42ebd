"""The one exception type the CLI turns into a one-line message and exit status 2."""


class UserError(Exception):
    """Bad input from the user: an unknown name, an out-of-range value, missing files.

    The message must name the bad value and say what to do about it, on one line.
    """
