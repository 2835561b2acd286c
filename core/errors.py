"""The one exception root of hemafed, split by what the operator (or the driver) should do.

    HemafedError
    ├── FatalError       stop and tell the operator what to do (key not on the federation's
    │                    list, certificate mismatch, plan refused, budget exhausted, ledger
    │                    damaged); retrying cannot help
    └── TransientError   the situation may clear by itself (connection lost, aggregator
                         restarting): reconnect with back-off

Subsystems keep their own trees (`hemafed.network.errors`, `hemafed.core.secagg.errors`,
…) and hang them under these two where the distinction applies. Every error carries a
one-line `message` for people and, for fatal ones, `what_to_do`: the next step, in words
an operator understands.
"""

from __future__ import annotations


class HemafedError(Exception):
    """Base of every error hemafed raises on purpose."""

    what_to_do: str = ""

    def __init__(self, message: str = "", *, what_to_do: str | None = None) -> None:
        super().__init__(message)
        self.message = message  # a subclass may narrow it (e.g. the peer's text without a code)
        if what_to_do is not None:
            self.what_to_do = what_to_do

    def for_people(self) -> str:
        """One line for an operator: the message, then the next step when there is one."""
        return f"{self}; {self.what_to_do}" if self.what_to_do else str(self)


class FatalError(HemafedError):
    """Retrying will not help: stop, and show `message` and `what_to_do`."""


class TransientError(HemafedError):
    """May clear by itself: the driver reconnects or retries with back-off."""
