"""The one exception tree of secure aggregation.

Every error raised by ``hemafed.core.secagg`` derives from :class:`SecAggError` (a
:class:`hemafed.core.errors.HemafedError`)::

    SecAggError                      base; fields: round, site_id, detail
    ├── ConfigError                  parameters that could overflow or make no sense (also a ValueError)
    ├── InputError                   a site's own update, weight or extras out of bounds (also a ValueError)
    ├── MalformedMessage             bytes or fields that break the schema (type, version, sizes, ids)
    │   └── VectorLengthError        a masked vector of the wrong length or dtype
    ├── ProtocolStateError           a message the current stage does not accept (out of order, duplicate, unknown)
    │   └── RoundMismatch            a message that belongs to another round (e.g. a replay)
    ├── AuthenticationError          a cryptographic check failed
    │   ├── SignatureError           an advertised key without a valid signature of the site's identity key
    │   └── DecryptionError          a share that does not decrypt, or whose ids inside differ from outside
    ├── ConsistencyError             lists that contradict what the receiver saw: survivors/dropouts or key
    │                                list at a site (or a request to reveal both shares of one site); share or
    │                                unmask recipients at the aggregator
    └── ShamirError                  shares that cannot reconstruct a secret (too few, duplicate, out of range)

The fields are meant for local logs. Never send ``detail`` to a peer: close the connection with a generic
error (the network layer's job) so a peer learns nothing about our internal state.
"""

from __future__ import annotations

from ..errors import HemafedError


class SecAggError(HemafedError):
    """Base of all secure-aggregation errors.

    ``round`` and ``site_id`` say which round and which peer the error concerns, where known.
    """

    def __init__(self, detail: str, *, round: int | None = None, site_id: int | None = None) -> None:
        self.detail = detail
        self.round = round
        self.site_id = site_id
        where = []
        if round is not None:
            where.append(f"round {round}")
        if site_id is not None:
            where.append(f"site {site_id}")
        super().__init__(f"{detail} ({', '.join(where)})" if where else detail)


class ConfigError(SecAggError, ValueError):
    """Invalid parameters, e.g. a threshold out of range or bounds that could overflow the ring."""


class InputError(SecAggError, ValueError):
    """A site's update, weight or extras that the configured bounds cannot carry (wrong shape, NaN, too large)."""


class MalformedMessage(SecAggError):
    """A message (or its encoding) that does not fit the schema."""


class VectorLengthError(MalformedMessage):
    """A masked vector with the wrong length or dtype."""


class ProtocolStateError(SecAggError):
    """A message or call that the current stage does not accept."""


class RoundMismatch(ProtocolStateError):
    """A message for another round than the one in progress (stale or replayed)."""


class AuthenticationError(SecAggError):
    """A signature, tag or identity check failed."""


class SignatureError(AuthenticationError):
    """An advertised key that is unsigned or not signed by the site's identity key."""


class DecryptionError(AuthenticationError):
    """An encrypted share that fails to decrypt or names other ids inside than outside."""


class ConsistencyError(SecAggError):
    """Survivor/dropout lists that contradict what the site saw, or a request to reveal both shares of a site."""


class ShamirError(SecAggError):
    """Shares that cannot reconstruct a secret."""
