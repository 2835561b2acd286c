"""The site's side of one secure-aggregation round, as a sans-I/O state machine.

Drive it with :meth:`SiteSecAgg.start` (after local training) and :meth:`SiteSecAgg.receive` for each message
from the aggregator; both return the messages to send back. Every check runs before any state changes, so a
refused message (an exception from :mod:`.errors`) leaves the machine where it was and the caller decides
whether to close the connection.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Container, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import aead, kdf, prg, shamir
from .config import SecAggConfig
from .errors import ConfigError, ConsistencyError, InputError, ProtocolStateError, RoundMismatch
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
from .prg import RING_DTYPE
from .quantize import quantize
from .signing import sign_advert, sign_survivors, verify_advert, verify_survivors


class SiteStage(enum.Enum):
    NEW = "new"                        # start() not called yet
    AWAIT_KEY_LIST = "await_key_list"  # AdvertiseKeys sent
    AWAIT_SHARES = "await_shares"      # EncryptedShares sent
    AWAIT_UNMASK = "await_unmask"      # MaskedInput sent
    AWAIT_SIGNATURES = "await_signatures"  # SurvivorSignature sent (consistency check)
    DONE = "done"                      # UnmaskShares sent
    ABANDONED = "abandoned"            # the aggregator gave the round up


def kdf_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def self_mask_key(cfg: SecAggConfig, round: int, site_id: int, seed: bytes) -> bytes:
    return kdf.derive(seed, kdf.Purpose.SELF_MASK, kdf.context(cfg.federation_id, round, site_id))


class SiteSecAgg:
    """One site, one round. ``peers`` maps every site id of the round (this one included) to its identity key.

    ``roster``, when given, holds the identity public keys (raw 32 bytes) this site accepts as peers — e.g. a
    :class:`hemafed.core.trust.roster.Roster` from a roster signed by the federation's admin, or from fingerprints in
    the site's own configuration. A round whose
    participant list (which the aggregator supplies) holds any other key is refused before anything is sent,
    so a compromised aggregator cannot slip in keys of its own.
    """

    def __init__(self, cfg: SecAggConfig, round: int, site_id: int, identity: Ed25519PrivateKey,
                 peers: Mapping[int, Ed25519PublicKey], rng: np.random.Generator | None = None,
                 roster: Container[bytes] | None = None) -> None:
        cfg.check_round(len(peers))
        if site_id not in peers:
            raise ConfigError("this site is not among the round's peers", round=round, site_id=site_id)
        if any(not 1 <= i <= cfg.max_sites for i in peers):
            raise ConfigError(f"site ids must lie in 1..{cfg.max_sites}", round=round)
        if roster is not None:
            for sid, key in sorted(peers.items()):
                if kdf_raw(key) not in roster:
                    raise ConsistencyError("the round's participant list holds a key that is not on this site's "
                                           "roster", round=round, site_id=sid)
        self.cfg, self.round, self.site_id = cfg, round, site_id
        self._identity, self._peers, self._rng = identity, dict(peers), rng
        self.stage = SiteStage.NEW
        self._input: np.ndarray | None = None
        self._c_sk = self._s_sk = None
        self._adverts: dict[int, AdvertiseKeys] = {}   # U1, checked
        self._b_shares: dict[int, bytes] = {}          # owner -> my share of owner's self-mask seed
        self._s_shares: dict[int, bytes] = {}          # owner -> my share of owner's pairwise-mask key
        self._u2: frozenset[int] = frozenset()
        self._lists: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # the survivor/dropout lists signed
        self._seed: bytes | None = None
        self._mine: AdvertiseKeys | None = None
        self.revealed_self: frozenset[int] = frozenset()
        self.revealed_keys: frozenset[int] = frozenset()

    # ------------------------------------------------------------------ driving

    def start(self, update: np.ndarray, weight: int, extras: np.ndarray | None = None,
              noise: Callable[[np.ndarray], None] | None = None) -> list[Message]:
        """Quantize the input (the float update is not kept) and advertise fresh round keys. ``noise`` adds this
        site's share of distributed-DP noise to the quantized integers (see `quantize`)."""
        return self.start_ring(quantize(self.cfg, update, weight, extras, self._rng, noise=noise))

    def start_ring(self, ring_input: np.ndarray) -> list[Message]:
        """Take this site's input already in the ring (what `quantize` returns: the site trainer quantizes, noise
        share included) and advertise fresh round keys."""
        self._expect(SiteStage.NEW)
        ring_input = np.asarray(ring_input)
        if ring_input.dtype != RING_DTYPE or ring_input.shape != (self.cfg.vector_len,):
            raise InputError(f"the ring input must be a uint32 vector of length {self.cfg.vector_len}",
                             round=self.round, site_id=self.site_id)
        self._input = ring_input.copy()
        self._c_sk, c_pk = kdf.new_keypair()
        self._s_sk, s_pk = kdf.new_keypair()
        sig = sign_advert(self._identity, self.cfg.federation_id, self.round, self.site_id, c_pk, s_pk)
        self._mine = AdvertiseKeys(round=self.round, site_id=self.site_id, c_pk=c_pk, s_pk=s_pk, signature=sig)
        self.stage = SiteStage.AWAIT_KEY_LIST
        return [self._mine]

    def receive(self, msg: Message) -> list[Message]:
        """Take one message from the aggregator; return what to send back (possibly nothing)."""
        validate(msg, max_vector_len=self.cfg.vector_len)
        if msg.round != self.round:
            raise RoundMismatch(f"message for round {msg.round}", round=self.round)
        if isinstance(msg, RoundAbandoned):
            if self.stage in (SiteStage.DONE, SiteStage.ABANDONED):
                return []
            self._forget()
            self.stage = SiteStage.ABANDONED
            return []
        if isinstance(msg, KeyList):
            self._expect(SiteStage.AWAIT_KEY_LIST, msg)
            return [self._on_key_list(msg)]
        if isinstance(msg, ShareDelivery):
            self._expect(SiteStage.AWAIT_SHARES, msg)
            return [self._on_shares(msg)]
        if isinstance(msg, UnmaskRequest):
            self._expect(SiteStage.AWAIT_UNMASK, msg)
            return [self._on_unmask_request(msg)]
        if isinstance(msg, SignatureList):
            self._expect(SiteStage.AWAIT_SIGNATURES, msg)
            return [self._on_signatures(msg)]
        raise ProtocolStateError(f"a site does not accept {msg.type}", round=self.round)

    @property
    def finished(self) -> bool:
        return self.stage in (SiteStage.DONE, SiteStage.ABANDONED)

    # ------------------------------------------------------------------ stages

    def _on_key_list(self, msg: KeyList) -> EncryptedShares:
        adverts = {a.site_id: a for a in msg.adverts}
        if len(adverts) < self.cfg.threshold:
            raise ConsistencyError(f"key list has {len(adverts)} sites, threshold is {self.cfg.threshold}",
                                   round=self.round)
        if adverts.get(self.site_id) != self._mine:
            raise ConsistencyError("key list omits or alters this site's own keys", round=self.round)
        for sid, a in adverts.items():
            if sid not in self._peers:
                raise ConsistencyError("key list names a site outside the round", round=self.round, site_id=sid)
            verify_advert(self._peers[sid], a.signature, self.cfg.federation_id, self.round, sid, a.c_pk, a.s_pk)
        keys = [a.c_pk for a in adverts.values()] + [a.s_pk for a in adverts.values()]
        if len(set(keys)) != len(keys):
            raise ConsistencyError("two advertised public keys are equal", round=self.round)

        seed = os.urandom(shamir.SECRET_LEN)
        ids = sorted(adverts)
        b_sh = shamir.split(seed, self.cfg.threshold, ids)
        s_sh = shamir.split(kdf.private_bytes(self._s_sk), self.cfg.threshold, ids)
        out = []
        for v in ids:
            if v == self.site_id:
                continue
            key = kdf.derive_pair_key(self._c_sk, adverts[v].c_pk, kdf.Purpose.SHARE_ENCRYPTION,
                                      self.cfg.federation_id, self.round, self.site_id, v)
            out.append((v, aead.seal(key, self.round, self.site_id, v, b_sh[v] + s_sh[v])))
        self._adverts, self._seed = adverts, seed
        self._b_shares[self.site_id], self._s_shares[self.site_id] = b_sh[self.site_id], s_sh[self.site_id]
        self.stage = SiteStage.AWAIT_SHARES
        return EncryptedShares(round=self.round, site_id=self.site_id, shares=tuple(out))

    def _on_shares(self, msg: ShareDelivery) -> MaskedInput:
        if msg.site_id != self.site_id:
            raise ConsistencyError(f"shares addressed to site {msg.site_id}", round=self.round)
        senders = [s for s, _ in msg.shares]
        unknown = set(senders) - (set(self._adverts) - {self.site_id})
        if unknown:
            raise ConsistencyError(f"shares from sites outside the key list: {sorted(unknown)}", round=self.round)
        if len(senders) + 1 < self.cfg.threshold:
            raise ConsistencyError("fewer than t sites sent shares", round=self.round)
        b_sh, s_sh = {}, {}
        for u, ct in msg.shares:
            key = kdf.derive_pair_key(self._c_sk, self._adverts[u].c_pk, kdf.Purpose.SHARE_ENCRYPTION,
                                      self.cfg.federation_id, self.round, self.site_id, u)
            payload = aead.open_(key, self.round, u, self.site_id, ct)
            b_sh[u], s_sh[u] = payload[:shamir.SHARE_LEN], payload[shamir.SHARE_LEN:]

        y, self._input = self._input, None  # masked in place: the plain input stops existing here
        prg.apply_mask(y, self_mask_key(self.cfg, self.round, self.site_id, self._seed), +1)
        for v in senders:
            key = kdf.derive_pair_key(self._s_sk, self._adverts[v].s_pk, kdf.Purpose.PAIRWISE_MASK,
                                      self.cfg.federation_id, self.round, self.site_id, v)
            prg.apply_mask(y, key, +1 if self.site_id < v else -1)
        self._b_shares.update(b_sh)
        self._s_shares.update(s_sh)
        self._u2 = frozenset(senders) | {self.site_id}
        self._seed = None
        self.stage = SiteStage.AWAIT_UNMASK
        return MaskedInput(round=self.round, site_id=self.site_id, vector=y)

    def _on_unmask_request(self, msg: UnmaskRequest) -> SurvivorSignature:
        """Check the lists, then sign them; no share leaves before ≥ t sites are shown to have signed the same."""
        self._check_lists(msg.survivors, msg.dropouts)
        self._lists = (tuple(sorted(msg.survivors)), tuple(sorted(msg.dropouts)))
        sig = sign_survivors(self._identity, self.cfg.federation_id, self.round, *self._lists)
        self.stage = SiteStage.AWAIT_SIGNATURES
        return SurvivorSignature(round=self.round, site_id=self.site_id, signature=sig)

    def _on_signatures(self, msg: SignatureList) -> UnmaskShares:
        lists = (tuple(sorted(msg.survivors)), tuple(sorted(msg.dropouts)))
        if lists != self._lists:
            raise ConsistencyError("the signature list is for other survivor and dropout lists than this site "
                                   "signed", round=self.round)
        signers = dict(msg.signatures)
        if self.site_id not in signers:
            raise ConsistencyError("the signature list omits this site's own signature", round=self.round)
        if not set(signers) <= set(lists[0]):
            raise ConsistencyError("a signer is not among the survivors", round=self.round)
        if len(signers) < self.cfg.threshold:
            raise ConsistencyError(f"{len(signers)} sites signed the survivor list, threshold is "
                                   f"{self.cfg.threshold}", round=self.round)
        for sid, sig in signers.items():
            verify_survivors(self._peers[sid], sig, self.cfg.federation_id, self.round, sid, *lists)
        return self._unmask_shares(*lists)

    def _check_lists(self, survivors_in: tuple[int, ...], dropouts_in: tuple[int, ...]) -> None:
        survivors, dropouts = set(survivors_in), set(dropouts_in)
        if survivors & dropouts:
            raise ConsistencyError("survivor and dropout lists overlap", round=self.round)
        if survivors | dropouts != self._u2:
            raise ConsistencyError("survivors and dropouts differ from the sites that sent this site shares",
                                   round=self.round)
        if self.site_id not in survivors:
            raise ConsistencyError("this site sent its masked input but is not listed as a survivor",
                                   round=self.round)
        if len(survivors) < self.cfg.threshold:
            raise ConsistencyError("fewer than t survivors", round=self.round)
        # Belt and braces beyond the overlap check: never hand out both shares of one site, across calls too.
        if survivors & self.revealed_keys or dropouts & self.revealed_self:
            raise ConsistencyError("would reveal both shares of one site", round=self.round)

    def _unmask_shares(self, survivors_in: tuple[int, ...], dropouts_in: tuple[int, ...]) -> UnmaskShares:
        survivors, dropouts = set(survivors_in), set(dropouts_in)
        self._check_lists(survivors_in, dropouts_in)
        reply = UnmaskShares(round=self.round, site_id=self.site_id,
                             self_mask_shares=tuple((u, self._b_shares[u]) for u in sorted(survivors)),
                             key_shares=tuple((v, self._s_shares[v]) for v in sorted(dropouts)))
        self.revealed_self |= survivors
        self.revealed_keys |= dropouts
        self._forget()
        self.stage = SiteStage.DONE
        return reply

    # ------------------------------------------------------------------ helpers

    def _expect(self, stage: SiteStage, msg: Message | None = None) -> None:
        if self.stage != stage:
            what = msg.type if msg is not None else "start()"
            raise ProtocolStateError(f"{what} not accepted in stage {self.stage.value}", round=self.round,
                                     site_id=self.site_id)

    def _forget(self) -> None:
        self._input = self._seed = self._c_sk = self._s_sk = None
        self._b_shares, self._s_shares = {}, {}
