"""The exception and warning family of lightning_repsim.

Every error we raise derives from :class:`RepSimError`; the ones about bad arguments or
shapes are also ``ValueError`` so that ``except ValueError`` keeps working for users.
Messages name what was passed (layer, shape, argument) and what to change.
"""


class RepSimError(Exception):
    """Base class of every exception raised by lightning_repsim."""


class RepSimValueError(RepSimError, ValueError):
    """An argument, shape or configuration that cannot work; the message says how to fix it."""


class RepSimWarning(UserWarning):
    """Degenerate input (a dead layer, NaN/Inf, an under-determined CCA) or a lossy fallback."""


class RepSimIntegrityError(RepSimError):
    """A stored file that is damaged (its bytes fail their checksum, its header disagrees with the
    manifest) or foreign (written by another run, or on another probe set); the message names the file."""


def one_line(message: object) -> str:
    """``message`` (an exception or a warning's text) on one line, runs of whitespace as one space."""
    return " ".join(str(message).split())
