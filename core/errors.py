"""The one exception root of hemafed, split by what the operator (or the driver) should do.

    HemafedError                         every error hemafed raises on purpose (tests/test_structure.py checks it)
    ├── FatalError                       stop and tell the operator what to do; retrying cannot help
    │   ├── LedgerCorrupt, BudgetExhausted       (core.privacy.ledger)
    │   ├── PlanRefused                          (core.rounds.site_round)
    │   ├── RosterError                          (core.trust.roster)
    │   ├── DatasetUnavailable                   (core.data.bloodmnist)
    │   └── AuthenticationRefused, CertificateRejected   (network.errors)
    ├── TransientError                   may clear by itself (connection lost, aggregator restarting):
    │   └── ConnectionLost, ConnectFailed, NotConnected  reconnect with back-off (network.errors)
    ├── SecAggError                      secure aggregation's own tree (core.secagg.errors)
    ├── NetworkError                     the transport's tree (network.errors; its fatal and transient
    │                                    members are listed above)
    ├── PlanError, LedgerError, BudgetTooSmall, IdentityError, StrictJSONError, ImageRejected,
    │   ModelFileError, TrainingCancelled, MessageRefused   (the rooms of core/ that raise them)
    └── UserFacingError, Cancelled       the command line and the app

Every error carries a one-line `message` for people and, for fatal ones, `what_to_do`: the
next step, in words an operator understands.
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
