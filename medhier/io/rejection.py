"""The typed rejection: an input refused as a whole, for a reason code a report can carry.

Every stage that refuses a whole file, series or volume pair (:mod:`medhier.io.dicom`,
:mod:`medhier.io.volume`, :mod:`medhier.io.seg`, :mod:`medhier.plaque.register`) raises a
subclass of :class:`Rejection` that names its module's table of reason codes, so a caller handles
them alike: ``reason`` is a stable code (a report value), ``message`` says what was wrong with
which input, and ``str(exc)`` is ``"reason: message"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

__all__ = ["Rejection"]


class Rejection(Exception):
    """An input refused for ``reason``, a code from the subclass's :attr:`reasons` table
    (code -> what it means); ``message`` names the input and the problem."""

    reasons: ClassVar[Mapping[str, str]] = {}

    def __init__(self, reason: str, message: str):
        # An unknown code is a bug in medhier, not bad input: reports must only hold listed codes.
        assert reason in self.reasons, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):
        # Exceptions pickle as (class, args): args is the one "reason: message" string, which the
        # constructor cannot take back. Ray pickles an exception raised in a task to re-raise it.
        return _rebuild, (type(self), self.reason, self.message, dict(self.__dict__))


def _rebuild(cls: type[Rejection], reason: str, message: str, state: dict) -> Rejection:
    rejection = cls.__new__(cls)
    Exception.__init__(rejection, f"{reason}: {message}")
    rejection.__dict__.update(state)
    return rejection
