"""A site's long-term Ed25519 identity key.

The private key lives in `<state>/identity/ed25519.key` (PKCS#8 PEM, owner-only,
like an ssh key); the public half travels as one line of text,

    hemafed-ed25519 <base64 of the 32 raw bytes> [comment]

which an IT admin pastes into the aggregator's list of allowed sites. Fingerprints
are `SHA256:<base64>` (as ssh prints them) or a short hex form for reading aloud.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hemafed.core import paths

from ..atomic import atomic_write_bytes
from ..errors import HemafedError

KEY_TYPE = "hemafed-ed25519"
KEY_DIR = "identity"
KEY_FILE = "ed25519.key"
PUB_FILE = "ed25519.pub"
_SITE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


class IdentityError(HemafedError):
    """The identity key is missing, unreadable, unsafe or malformed; the message says what to do."""


@dataclass(frozen=True)
class IdentityKey:
    private_key: Ed25519PrivateKey
    path: Path | None = None

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def public_bytes(self) -> bytes:
        return public_raw(self.public_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def public_line(self, comment: str = "") -> str:
        return public_line(self.public_key, comment)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @classmethod
    def generate(cls) -> IdentityKey:
        """An in-memory key (tests, simulations); `init_identity` is the persistent one."""
        return cls(Ed25519PrivateKey.generate())


def key_path(state_dir: str | os.PathLike[str] | None = None) -> Path:
    return paths.state_dir(state_dir) / KEY_DIR / KEY_FILE


def init_identity(state_dir: str | os.PathLike[str] | None = None, *, force: bool = False) -> IdentityKey:
    """Create and store a new identity key; refuses to replace an existing one unless `force`."""
    path = key_path(state_dir)
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.name == "posix":
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by umask and ignored for existing dirs
    if path.exists() and not force:
        raise IdentityError(
            f"an identity key already exists at {path}; replacing it means the aggregator must be given "
            "the new public key (use --force to replace it)"
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        atomic_write_bytes(path, pem, 0o600, overwrite=force)
    except FileExistsError:
        raise IdentityError(f"{path} appeared while writing; not overwriting it") from None
    identity = IdentityKey(key, path)
    atomic_write_bytes(folder / PUB_FILE, (identity.public_line() + "\n").encode(), 0o644)
    return identity


def load_identity(state_dir: str | os.PathLike[str] | None = None) -> IdentityKey:
    """Load the identity key; refuses a key file other users could read, as ssh does."""
    path = key_path(state_dir)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(f"no identity key at {path}; create one with `hemafed keys init`") from None
    if os.name == "posix":
        if st.st_mode & 0o077:
            raise IdentityError(
                f"permissions {stat.S_IMODE(st.st_mode):04o} on {path} are too open: the private key must be "
                f"readable by its owner only (chmod 600 {path})"
            )
        if st.st_uid != os.getuid():
            raise IdentityError(f"{path} is owned by another user; refusing to use it")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path} is not a readable private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return IdentityKey(key, path)


def public_raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public_key: Ed25519PublicKey | bytes) -> str:
    """`SHA256:` + unpadded base64 of the SHA-256 of the raw public key (ssh's format)."""
    digest = hashlib.sha256(_raw(public_key)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def short_fingerprint(public_key: Ed25519PublicKey | bytes) -> str:
    """The first 80 bits of the SHA-256 as five hex groups, for reading over the phone."""
    hexd = hashlib.sha256(_raw(public_key)).hexdigest()[:20]
    return " ".join(hexd[i : i + 4] for i in range(0, 20, 4))


def public_line(public_key: Ed25519PublicKey, comment: str = "") -> str:
    line = f"{KEY_TYPE} {base64.b64encode(public_raw(public_key)).decode()}"
    comment = " ".join(comment.split())  # one line, whatever the caller passed
    return f"{line} {comment}" if comment else line


def parse_public_line(line: str) -> Ed25519PublicKey:
    """Parse `hemafed-ed25519 <base64> [comment]`; raises `IdentityError` with what is wrong."""
    parts = line.strip().split(maxsplit=2)
    if len(parts) < 2 or parts[0] != KEY_TYPE:
        raise IdentityError(f"not a hemafed public key line (expected '{KEY_TYPE} <base64>'): {line.strip()[:80]!r}")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError("the public key is not valid base64") from None
    if len(raw) != 32:
        raise IdentityError(f"an Ed25519 public key is 32 bytes, this one is {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def allowed_sites(entries: Mapping[str, str | Ed25519PublicKey]) -> dict[bytes, str]:
    """Map raw public key -> site name from the aggregator's config (name -> key line).

    Refuses bad site names and a key listed under two names (which would make the
    site's identity ambiguous in every log and round).
    """
    out: dict[bytes, str] = {}
    for name, key in entries.items():
        if not isinstance(name, str) or not _SITE_NAME_RE.match(name):
            raise IdentityError(f"site name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        pk = parse_public_line(key) if isinstance(key, str) else key
        raw = public_raw(pk)
        if raw in out:
            raise IdentityError(f"sites {out[raw]!r} and {name!r} list the same key {fingerprint(raw)}")
        out[raw] = name
    return out


def _raw(public_key: Ed25519PublicKey | bytes) -> bytes:
    return public_key if isinstance(public_key, bytes) else public_raw(public_key)


