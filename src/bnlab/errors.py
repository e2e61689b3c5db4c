"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class BnlabError(Exception):
    """Base class of bnlab's user-facing errors."""


class DatasetError(BnlabError):
    """Fashion-MNIST is missing, incomplete or not the real thing; the message says which file."""
