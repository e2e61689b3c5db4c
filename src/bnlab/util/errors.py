"""Errors a user can act on. The CLI prints them as one line, without a traceback."""

import errno


class BnlabError(Exception):
    """Base class of bnlab's user-facing errors."""


class DatasetError(BnlabError):
    """Fashion-MNIST is missing, incomplete or not the real thing; the message says which file."""


class ConfigError(BnlabError, ValueError):
    """A config value out of its range or of the wrong kind; the message says what was expected.

    Also a ValueError, the error Python raises for a bad value, so callers that build configs
    from data (and their tests) can catch it as one.
    """


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file operation: the path(s) and the cause in words.

    ``ENOSPC`` is said plainly ("no space left on device"): some writers report a full disk
    in terms of their own state.
    """
    cause = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {cause}" if paths else cause
