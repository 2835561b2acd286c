"""Parameters of a secure-aggregation federation, shared by the sites and the aggregator."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

RING_BITS = 32  # uint32 on the wire: as compact as the float32 update itself


@dataclass(frozen=True)
class SecAggConfig:
    """What every party of a round must agree on (it comes with the federation plan).

    federation_id: binds signatures and derived keys to this federation.
    threshold:     t, shares needed to reconstruct a secret; the aggregator needs t live sites at every stage.
    dim:           length of the float32 update vector.
    n_extras:      length of the int64 extras vector (e.g. a flattened confusion matrix).
    clip:          each update coordinate is clipped to [-clip, clip] before quantization.
    max_sites:     most sites a round may have; fixes the scale so their sum cannot overflow the ring.
    max_weight:    largest weight (sample count) a site may send.
    max_extra:     largest value of one extras entry.
    """

    federation_id: str
    threshold: int
    dim: int
    n_extras: int = 0
    clip: float = 1.0
    max_sites: int = 64
    max_weight: int = 2**20
    max_extra: int = 2**24

    def __post_init__(self) -> None:
        if not self.federation_id or len(self.federation_id.encode()) > 256:
            raise ConfigError("federation_id must be 1..256 bytes of UTF-8")
        if not 2 <= self.max_sites <= 2**16:
            raise ConfigError("max_sites must be in 2..65536")
        if not 2 <= self.threshold <= self.max_sites:
            raise ConfigError(f"threshold must be in 2..max_sites, got {self.threshold}")
        if self.dim < 0 or self.n_extras < 0 or self.vector_len > 2**31:
            raise ConfigError("dim and n_extras must be non-negative and fit a 2^31-word vector")
        if not self.clip > 0 or self.clip != self.clip or self.clip == float("inf"):
            raise ConfigError("clip must be a positive finite number")
        # weight and extras ride as unsigned integers: their sum over max_sites must stay below 2^32
        if self.max_weight < 1 or self.max_sites * self.max_weight >= 2**RING_BITS:
            raise ConfigError("max_sites * max_weight must be below 2^32")
        if self.max_extra < 1 or self.max_sites * self.max_extra >= 2**RING_BITS:
            raise ConfigError("max_sites * max_extra must be below 2^32")

    @property
    def vector_len(self) -> int:
        """Words in the masked vector: update, then weight, then extras."""
        return self.dim + 1 + self.n_extras

    @property
    def levels(self) -> int:
        """L: one site's quantized coordinate lies in [-L, L], so max_sites of them sum inside int32."""
        return (2 ** (RING_BITS - 1) - 1) // self.max_sites

    @property
    def scale(self) -> float:
        """Quantization steps per unit of (weight / max_weight) * clipped update."""
        return self.levels / self.clip

    def check_round(self, n_sites: int) -> None:
        """Refuse a round whose size this configuration cannot carry safely."""
        if not 2 <= n_sites <= self.max_sites:
            raise ConfigError(f"a round needs 2..{self.max_sites} sites, got {n_sites}")
        if self.threshold > n_sites:
            raise ConfigError(f"threshold {self.threshold} exceeds the {n_sites} sites of the round")
        # t > n/2: an aggregator that told some sites "u survived" and others "u dropped" would need t shares
        # from each disjoint group to learn both u's self mask and its pairwise key; 2t > n makes that impossible.
        if 2 * self.threshold <= n_sites:
            raise ConfigError(f"threshold {self.threshold} must exceed half of the {n_sites} sites")
