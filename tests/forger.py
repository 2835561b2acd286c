"""A site identity that claims another site's public key but can only sign with its own."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from hemafed.core.trust.identity import IdentityKey


@dataclass(frozen=True)
class Forger(IdentityKey):
    claimed: Ed25519PublicKey | None = None

    @property
    def public_key(self) -> Ed25519PublicKey:
        assert self.claimed is not None
        return self.claimed
