"""Secure aggregation (Bonawitz et al. 2017, semi-honest with dropouts) as sans-I/O state machines.

Primitives: :mod:`.kdf` (X25519 + HKDF), :mod:`.aead` (AES-GCM shares), :mod:`.signing` (Ed25519),
:mod:`.shamir`, :mod:`.prg` (AES-CTR masks), :mod:`.quantize`. Protocol: :class:`SiteSecAgg`,
:class:`AggregatorSecAgg`, messages and their wire format in :mod:`.messages`. See docs/secure-aggregation.md.
"""

from .aggregator import Abandoned, AggregatorSecAgg, AggStage, Outgoing, SecAggResult
from .config import SecAggConfig
from .errors import (
                     AuthenticationError,
                     ConfigError,
                     ConsistencyError,
                     DecryptionError,
                     InputError,
                     MalformedMessage,
                     ProtocolStateError,
                     RoundMismatch,
                     SecAggError,
                     ShamirError,
                     SignatureError,
                     VectorLengthError,
)
from .messages import (
                     SCHEMA_VERSION,
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
                     decode,
                     encode,
                     peek_type,
)
from .site import SiteSecAgg, SiteStage

__all__ = [
    "SCHEMA_VERSION", "Abandoned", "AdvertiseKeys", "AggStage", "AggregatorSecAgg", "AuthenticationError",
    "ConfigError", "ConsistencyError", "DecryptionError", "EncryptedShares", "InputError", "KeyList",
    "MalformedMessage", "MaskedInput", "Message", "Outgoing", "ProtocolStateError", "RoundAbandoned",
    "RoundMismatch", "SecAggConfig", "SecAggError", "SecAggResult", "ShamirError", "ShareDelivery",
    "SignatureError", "SignatureList", "SiteSecAgg", "SiteStage", "SurvivorSignature", "UnmaskRequest",
    "UnmaskShares", "VectorLengthError", "decode",
    "encode", "peek_type",
]
