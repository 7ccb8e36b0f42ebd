"""The one exception type the CLI turns into a one-line message and exit status 2, and the one
integer rule the checks that raise it use."""

import errno
import numbers
import shutil
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: an unknown name, an out-of-range value, missing files.

    The message must name the bad value and say what to do about it, on one line.
    """


def is_int(value: object, minimum: int | None = None) -> bool:
    """The one integer rule every check uses: an integral number (Python's or numpy's; a bool is
    not one) and, when ``minimum`` is given, at least that."""
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and (minimum is None or value >= minimum))


class DiskFull(UserError):
    """No space left on the device a file was being written to: said in one line, naming the
    directory, the space needed and the space free; what was finished stays (every file is
    written whole or not at all), so the same command resumes once space is freed."""


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def disk_full(path: str | Path, needed: int, what: str = "") -> DiskFull:
    """The one-line DiskFull for a write of ``needed`` bytes to ``path``."""
    folder = Path(path).parent
    try:
        free = _mb(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    return DiskFull(f"no space left on the device of {folder} ({what or Path(path).name}: "
                    f"{_mb(needed)} needed, {free} free); free space there (or pick another "
                    "--out) and run the same command again: finished files are kept")


def disk_full_line(err: BaseException) -> str | None:
    """The one line for an ENOSPC that reached the top (a write not made through ``io``, e.g.
    Tune's state or torch's checkpoints); None for any other error."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" writing {err.filename}" if err.filename else ""
        return (f"no space left on the device{where}; free space there (or pick another --out) "
                "and run the same command again: finished files are kept")
    return None
