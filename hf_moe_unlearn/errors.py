"""Exceptions raised by hf-moe-unlearn. Each message says what went wrong and what to do about it."""


class MoEUnlearnError(ValueError):
    """Base class for every user-facing error of hf-moe-unlearn (a ``ValueError``: it is always bad input)."""
