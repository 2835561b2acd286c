"""The aggregator's side of one secure-aggregation round, as a sans-I/O state machine.

The network layer calls :meth:`AggregatorSecAgg.receive` with each message and the (authenticated) id of the
connection it came on, :meth:`site_dropped` when a connection closes and :meth:`deadline_passed` when the
stage's time-out fires; each returns the :class:`Outgoing` messages to send. The round ends with
:attr:`outcome` set to a :class:`SecAggResult` or an :class:`Abandoned`.

Masked vectors are summed as they arrive, so the object only ever holds masked vectors and their running sum;
the unmasked value it computes is the sum over all survivors.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import kdf, prg, shamir
from .config import SecAggConfig
from .errors import (
    AuthenticationError,
    ConfigError,
    ConsistencyError,
    ProtocolStateError,
    RoundMismatch,
    SecAggError,
    VectorLengthError,
)
from .messages import (
    AdvertiseKeys,
    EncryptedShares,
    KeyList,
    MaskedInput,
    Message,
    RoundAbandoned,
    ShareDelivery,
    SignatureList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskShares,
    validate,
)
from .quantize import dequantize
from .signing import verify_advert, verify_survivors
from .site import self_mask_key


class AggStage(enum.Enum):
    COLLECT_KEYS = "collect_keys"
    COLLECT_SHARES = "collect_shares"
    COLLECT_MASKED = "collect_masked"
    COLLECT_SIGNATURES = "collect_signatures"  # consistency check: survivors sign the survivor/dropout lists
    COLLECT_UNMASK = "collect_unmask"
    DONE = "done"
    ABANDONED = "abandoned"


_EXPECTS = {AggStage.COLLECT_KEYS: AdvertiseKeys, AggStage.COLLECT_SHARES: EncryptedShares,
            AggStage.COLLECT_MASKED: MaskedInput, AggStage.COLLECT_SIGNATURES: SurvivorSignature,
            AggStage.COLLECT_UNMASK: UnmaskShares}


class Outgoing(NamedTuple):
    """A message for one site."""

    to: int
    message: Message


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """The round's output: sums over ``survivors`` only.

    weighted_sum: Σ w_i·clip(Δ_i), float32 (dequantized); weight_sum: Σ w_i; extras_sum: Σ extras (int64);
    ring_sum: the exact unmasked sum in Z_{2^32}, for tests and audits.
    """

    round: int
    weighted_sum: np.ndarray = field(repr=False)
    weight_sum: int
    extras_sum: np.ndarray = field(repr=False)
    survivors: tuple[int, ...]
    dropouts: tuple[int, ...]
    ring_sum: np.ndarray = field(repr=False)

    def average(self) -> np.ndarray:
        """The weighted mean update Σ w_i Δ_i / Σ w_i."""
        if self.weight_sum <= 0:
            raise ZeroDivisionError("the survivors' weights sum to zero")
        return (self.weighted_sum.astype(np.float64) / self.weight_sum).astype(np.float32)


@dataclass(frozen=True)
class Abandoned:
    """The round was given up at ``stage``; nothing about any site's input was revealed."""

    round: int
    stage: str
    reason: str


class AggregatorSecAgg:
    """One round at the aggregator. ``identities`` maps each site id of the round to its identity public key."""

    def __init__(self, cfg: SecAggConfig, round: int, identities: Mapping[int, Ed25519PublicKey]) -> None:
        cfg.check_round(len(identities))
        if any(not 1 <= i <= cfg.max_sites for i in identities):
            raise ConfigError(f"site ids must lie in 1..{cfg.max_sites}", round=round)
        self.cfg, self.round = cfg, round
        self._ids = dict(identities)
        self.stage = AggStage.COLLECT_KEYS
        self.outcome: SecAggResult | Abandoned | None = None
        self._gone: set[int] = set()
        self._pending: set[int] = set(identities)
        self._answered: dict[int, Message] = {}
        self._adverts: dict[int, AdvertiseKeys] = {}
        self._u1: frozenset[int] = frozenset()
        self._u2: frozenset[int] = frozenset()
        self._u3: frozenset[int] = frozenset()
        self._sum: np.ndarray | None = None

    # ------------------------------------------------------------------ inputs from the network layer

    def receive(self, site_id: int, msg: Message) -> list[Outgoing]:
        """A message that arrived on site ``site_id``'s authenticated connection.

        Raises a :class:`~.errors.SecAggError` for anything malformed, out of order or failing a check (the
        state is then unchanged). Messages of this round arriving after it finished are ignored.
        """
        validate(msg, max_vector_len=self.cfg.vector_len)
        if msg.round != self.round:
            raise RoundMismatch(f"message for round {msg.round}", round=self.round, site_id=site_id)
        if site_id not in self._ids:
            raise ProtocolStateError("unknown site", round=self.round, site_id=site_id)
        if self.finished:
            return []  # a late answer racing the end of the round (e.g. after an abandon) is not an error
        expected = _EXPECTS.get(self.stage)
        if expected is None or not isinstance(msg, expected):
            raise ProtocolStateError(f"{msg.type} not accepted in stage {self.stage.value}", round=self.round,
                                     site_id=site_id)
        if msg.site_id != site_id:
            raise AuthenticationError(f"message claims to come from site {msg.site_id}", round=self.round,
                                      site_id=site_id)
        if site_id not in self._pending or site_id in self._gone:
            raise ProtocolStateError("no message expected from this site now", round=self.round, site_id=site_id)
        check = {AdvertiseKeys: self._check_advert, EncryptedShares: self._check_shares,
                 MaskedInput: self._check_masked, SurvivorSignature: self._check_signature,
                 UnmaskShares: self._check_unmask}[type(msg)]
        check(site_id, msg)
        if isinstance(msg, MaskedInput):
            # sum on arrival: no per-site vector is kept, and memory stays at one vector
            if self._sum is None:
                self._sum = msg.vector.astype(prg.RING_DTYPE, copy=True)
            else:
                np.add(self._sum, msg.vector, out=self._sum)
            self._answered[site_id] = None
        else:
            self._answered[site_id] = msg
        self._pending.discard(site_id)
        return self._progress()

    def site_dropped(self, site_id: int) -> list[Outgoing]:
        """The site's connection closed or it timed out; it takes no further part in the round."""
        if site_id not in self._ids:
            raise ProtocolStateError("unknown site", round=self.round, site_id=site_id)
        if self.finished or site_id in self._gone:
            return []
        self._gone.add(site_id)
        self._pending.discard(site_id)
        return self._progress()

    def deadline_passed(self) -> list[Outgoing]:
        """The stage's time is up: go on with whoever answered (or abandon if fewer than t did)."""
        if self.finished:
            return []
        self._gone |= self._pending  # silent sites are dropouts from here on
        self._pending.clear()
        return self._progress()

    # ------------------------------------------------------------------ state

    @property
    def finished(self) -> bool:
        return self.stage in (AggStage.DONE, AggStage.ABANDONED)

    @property
    def awaiting(self) -> frozenset[int]:
        """Sites whose message the current stage still waits for."""
        return frozenset(self._pending - self._gone)

    # ------------------------------------------------------------------ checks per message

    def _check_advert(self, sid: int, msg: AdvertiseKeys) -> None:
        verify_advert(self._ids[sid], msg.signature, self.cfg.federation_id, self.round, sid, msg.c_pk, msg.s_pk)

    def _check_shares(self, sid: int, msg: EncryptedShares) -> None:
        if {r for r, _ in msg.shares} != self._u1 - {sid}:
            raise ConsistencyError("shares must go to every other site of the key list", round=self.round,
                                   site_id=sid)

    def _check_masked(self, sid: int, msg: MaskedInput) -> None:
        if len(msg.vector) != self.cfg.vector_len:
            raise VectorLengthError(f"masked vector has {len(msg.vector)} words, expected {self.cfg.vector_len}",
                                    round=self.round, site_id=sid)

    def _check_signature(self, sid: int, msg: SurvivorSignature) -> None:
        verify_survivors(self._ids[sid], msg.signature, self.cfg.federation_id, self.round, sid, *self._lists())

    def _lists(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(sorted(self._u3)), tuple(sorted(self._u2 - self._u3))

    def _check_unmask(self, sid: int, msg: UnmaskShares) -> None:
        if ({u for u, _ in msg.self_mask_shares} != self._u3
                or {v for v, _ in msg.key_shares} != self._u2 - self._u3):
            raise ConsistencyError("unmask shares do not match the survivor and dropout lists", round=self.round,
                                   site_id=sid)

    # ------------------------------------------------------------------ stage transitions

    def _progress(self) -> list[Outgoing]:
        if self.finished:
            return []
        live = set(self._answered) | (self._pending - self._gone)
        if self.stage in (AggStage.COLLECT_KEYS, AggStage.COLLECT_SHARES, AggStage.COLLECT_SIGNATURES):
            live -= self._gone  # keys, shares or a signature from a site that cannot go on are worthless; a
            #                     summed masked input or revealed shares stay useful after their sender leaves
        if len(live) < self.cfg.threshold:
            return self._abandon(f"{len(live)} live sites, threshold {self.cfg.threshold}")
        if self._pending - self._gone:
            return []
        collected, self._answered = self._answered, {}
        if self.stage == AggStage.COLLECT_KEYS:
            return self._after_keys({s: m for s, m in collected.items() if s not in self._gone})
        if self.stage == AggStage.COLLECT_SHARES:
            return self._after_shares({s: m for s, m in collected.items() if s not in self._gone})
        if self.stage == AggStage.COLLECT_MASKED:
            return self._after_masked(set(collected))
        if self.stage == AggStage.COLLECT_SIGNATURES:
            return self._after_signatures({s: m for s, m in collected.items() if s not in self._gone})
        return self._after_unmask(collected)

    def _after_keys(self, adverts: dict[int, AdvertiseKeys]) -> list[Outgoing]:
        self._adverts = dict(sorted(adverts.items()))
        self._u1 = frozenset(adverts)
        key_list = KeyList(round=self.round, adverts=tuple(self._adverts.values()))
        self._enter(AggStage.COLLECT_SHARES, self._u1)
        return [Outgoing(s, key_list) for s in sorted(self._u1)]

    def _after_shares(self, shares: dict[int, EncryptedShares]) -> list[Outgoing]:
        u2 = set(shares)
        inbox: dict[int, list[tuple[int, bytes]]] = {v: [] for v in u2}
        for u in sorted(u2):
            for v, ct in shares[u].shares:
                if v in u2:
                    inbox[v].append((u, ct))
        self._u2 = frozenset(u2)
        self._enter(AggStage.COLLECT_MASKED, u2)
        return [Outgoing(v, ShareDelivery(round=self.round, site_id=v, shares=tuple(inbox[v]))) for v in sorted(u2)]

    def _after_masked(self, u3: set[int]) -> list[Outgoing]:
        self._u3 = frozenset(u3)
        reachable = u3 - self._gone
        if len(reachable) < self.cfg.threshold:
            return self._abandon(f"{len(reachable)} survivors can answer, threshold {self.cfg.threshold}")
        req = UnmaskRequest(round=self.round, survivors=tuple(sorted(u3)), dropouts=tuple(sorted(self._u2 - u3)))
        self._enter(AggStage.COLLECT_SIGNATURES, reachable)
        return [Outgoing(s, req) for s in sorted(reachable)]

    def _after_signatures(self, sigs: dict[int, SurvivorSignature]) -> list[Outgoing]:
        survivors, dropouts = self._lists()
        out = SignatureList(round=self.round, survivors=survivors, dropouts=dropouts,
                            signatures=tuple((s, sigs[s].signature) for s in sorted(sigs)))
        self._enter(AggStage.COLLECT_UNMASK, set(sigs))
        return [Outgoing(s, out) for s in sorted(sigs)]

    def _after_unmask(self, replies: dict[int, UnmaskShares]) -> list[Outgoing]:
        try:
            ring_sum = self._unmask(replies)
        except SecAggError as exc:
            return self._abandon(f"unmasking failed: {exc.detail}")
        weighted, weight, extras = dequantize(self.cfg, ring_sum)
        self.outcome = SecAggResult(round=self.round, weighted_sum=weighted, weight_sum=weight, extras_sum=extras,
                                    survivors=tuple(sorted(self._u3)),
                                    dropouts=tuple(sorted(self._u2 - self._u3)), ring_sum=ring_sum)
        self._sum = None
        self.stage = AggStage.DONE
        return []

    def _unmask(self, replies: Mapping[int, UnmaskShares]) -> np.ndarray:
        t = self.cfg.threshold
        xs = sorted(replies)[:t]
        lams = shamir.lagrange_at_zero(xs)  # one set of responders for every secret
        self_sh = {x: dict(replies[x].self_mask_shares) for x in xs}
        key_sh = {x: dict(replies[x].key_shares) for x in xs}
        acc = self._sum
        for u in sorted(self._u3):
            seed = shamir.combine([self_sh[x][u] for x in xs], lams)
            prg.apply_mask(acc, self_mask_key(self.cfg, self.round, u, seed), -1)
        for v in sorted(self._u2 - self._u3):
            sk = kdf.private_from_bytes(shamir.combine([key_sh[x][v] for x in xs], lams))
            if kdf.public_bytes(sk) != self._adverts[v].s_pk:
                raise shamir.ShamirError("reconstructed mask key does not match the advertised key",
                                         round=self.round, site_id=v)
            for u in sorted(self._u3):
                key = kdf.derive_pair_key(sk, self._adverts[u].s_pk, kdf.Purpose.PAIRWISE_MASK,
                                          self.cfg.federation_id, self.round, v, u)
                prg.apply_mask(acc, key, -1 if u < v else +1)  # undo what survivor u added for the pair (u, v)
        return acc

    # ------------------------------------------------------------------ helpers

    def _enter(self, stage: AggStage, expected: set[int]) -> None:
        self.stage = stage
        self._pending = set(expected) - self._gone

    def _abandon(self, reason: str) -> list[Outgoing]:
        self.outcome = Abandoned(round=self.round, stage=self.stage.value, reason=reason)
        self.stage = AggStage.ABANDONED
        self._sum = None
        self._answered = {}
        note = RoundAbandoned(round=self.round, reason="fewer than the threshold of sites remain")
        return [Outgoing(s, note) for s in sorted(set(self._ids) - self._gone)]
