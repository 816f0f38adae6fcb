"""Exceptions raised by flashckpt.

Every error of the C++ core arrives as one of these classes, with the core's
message (which names the path, key, step or rank that failed). Each class also
derives from the closest built-in exception, so ``except FileNotFoundError``
and friends keep working.
"""

from __future__ import annotations


class FlashCkptError(RuntimeError):
    """Base class of every flashckpt error."""

    code = "INTERNAL"


class InvalidArgumentError(FlashCkptError, ValueError):
    """A bad option, or keys/shapes/dtypes that do not match on load."""

    code = "INVALID_ARGUMENT"


class NotFoundError(FlashCkptError, LookupError):
    """No such step, no committed step, or a missing file."""

    code = "NOT_FOUND"


class CorruptionError(FlashCkptError):
    """A checksum mismatch, a truncated file or an unreadable record."""

    code = "CORRUPTION"


class ResourceExhaustedError(FlashCkptError, MemoryError):
    """Disk full, /dev/shm too small, or the memlock limit reached."""

    code = "RESOURCE_EXHAUSTED"


class PermissionDeniedError(FlashCkptError, PermissionError):
    """The directory or the shared-memory segment is not accessible."""

    code = "PERMISSION_DENIED"


class FailedPreconditionError(FlashCkptError):
    """A directory of a newer format, or one another writer holds."""

    code = "FAILED_PRECONDITION"


class DeadlineExceededError(FlashCkptError, TimeoutError):
    """A wait ran past its deadline (for instance a rank that never became durable)."""

    code = "DEADLINE_EXCEEDED"


class UnavailableError(FlashCkptError):
    """CUDA was asked for but there is no GPU, or the build has no CUDA."""

    code = "UNAVAILABLE"


class StateDictMismatchError(InvalidArgumentError):
    """``load_into(strict=True)`` found missing, unexpected or mismatched keys."""

    def __init__(self, message, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        CorruptionError,
        ResourceExhaustedError,
        PermissionDeniedError,
        FailedPreconditionError,
        DeadlineExceededError,
        UnavailableError,
    )
}


def error_class(code: str) -> type:
    """The exception class of a core error code (used by the extension)."""
    return _BY_CODE.get(code, FlashCkptError)


__all__ = [
    "FlashCkptError",
    "InvalidArgumentError",
    "NotFoundError",
    "CorruptionError",
    "ResourceExhaustedError",
    "PermissionDeniedError",
    "FailedPreconditionError",
    "DeadlineExceededError",
    "UnavailableError",
    "StateDictMismatchError",
    "error_class",
]
