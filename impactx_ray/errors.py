"""The one exception type the CLI turns into a one-line message and exit status 2, and the one
integer rule the checks that raise it use."""

import numbers


class UserError(Exception):
    """Bad input from the user: an unknown name, an out-of-range value, missing files.

    The message must name the bad value and say what to do about it, on one line.
    """


def is_int(value: object, minimum: int | None = None) -> bool:
    """The one integer rule every check uses: an integral number (Python's or numpy's; a bool is
    not one) and, when ``minimum`` is given, at least that."""
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and (minimum is None or value >= minimum))
