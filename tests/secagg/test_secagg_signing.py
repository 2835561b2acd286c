from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hemafed.core.secagg.errors import SignatureError
from hemafed.core.secagg.signing import sign_advert, verify_advert

ID = Ed25519PrivateKey.generate()
C, S = os.urandom(32), os.urandom(32)


def test_valid_signature_verifies():
    verify_advert(ID.public_key(), sign_advert(ID, "fed", 4, 2, C, S), "fed", 4, 2, C, S)


@pytest.mark.parametrize("changed", ["fed", "round", "site", "c", "s", "swap"])
def test_any_change_breaks_the_signature(changed):
    sig = sign_advert(ID, "fed", 4, 2, C, S)
    args = {"federation_id": "fed", "round": 4, "site_id": 2, "c_pk": C, "s_pk": S}
    if changed == "fed":
        args["federation_id"] = "other"
    elif changed == "round":
        args["round"] = 5
    elif changed == "site":
        args["site_id"] = 3
    elif changed == "c":
        args["c_pk"] = os.urandom(32)
    elif changed == "s":
        args["s_pk"] = os.urandom(32)
    else:
        args["c_pk"], args["s_pk"] = S, C
    with pytest.raises(SignatureError):
        verify_advert(ID.public_key(), sig, **args)


def test_unsigned_and_foreign_signatures_are_refused():
    with pytest.raises(SignatureError):
        verify_advert(ID.public_key(), b"", "fed", 4, 2, C, S)
    other = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError):
        verify_advert(ID.public_key(), sign_advert(other, "fed", 4, 2, C, S), "fed", 4, 2, C, S)
