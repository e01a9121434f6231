"""The one exception type a user of sed_lens can cause.

Every error a user can provoke (an unknown op, a bad window, a missing run directory) raises
:class:`SedLensError`, a :class:`ValueError` whose message is one clear sentence. Command-line entry points
turn it into one line on stderr and exit code 2 (see :mod:`sed_lens.cli`).
"""

from __future__ import annotations


class SedLensError(ValueError):
    """A problem with what the user asked for, explained in one sentence."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`SedLensError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise SedLensError(message)
