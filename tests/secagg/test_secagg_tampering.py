"""A relay (or outsider) that alters, replays or forges messages is refused with a typed error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from secagg_harness import make_round, random_inputs, wire

from hemafed.core.secagg import (
    AdvertiseKeys,
    AggStage,
    AuthenticationError,
    DecryptionError,
    KeyList,
    MalformedMessage,
    MaskedInput,
    RoundMismatch,
    SecAggConfig,
    SecAggError,
    ShareDelivery,
    SignatureError,
    SiteStage,
    VectorLengthError,
    decode,
    encode,
)
from hemafed.core.secagg.signing import sign_advert

CFG = SecAggConfig(federation_id="tamper", threshold=3, dim=16, n_extras=2, max_sites=8, max_weight=100,
                   max_extra=50)


def start(round=0, n=4, seed=0):
    agg, sites, keys = make_round(CFG, n, round=round, seed=seed)
    inputs = random_inputs(CFG, sites, np.random.default_rng(seed))
    adv = {i: s.start(*inputs[i])[0] for i, s in sites.items()}
    return agg, sites, keys, inputs, adv


def to_shares_stage(agg, sites, adv):
    out = []
    for i, a in adv.items():
        out += agg.receive(i, a)
    deliveries = []
    for to, kl in out:
        deliveries += agg.receive(to, sites[to].receive(kl)[0])
    assert agg.stage is AggStage.COLLECT_MASKED
    return {o.to: o.message for o in deliveries}


def test_share_with_swapped_sender_and_receiver_is_refused():
    agg, sites, _, _, adv = start()
    deliveries = to_shares_stage(agg, sites, adv)
    # the ciphertext 2 -> 1 is handed back to site 2 as if site 1 had sent it to site 2 (same pair key!)
    ct_2_to_1 = dict(deliveries[1].shares)[2]
    forged = dict(deliveries[2].shares)
    forged[1] = ct_2_to_1
    with pytest.raises(DecryptionError):
        sites[2].receive(ShareDelivery(round=0, site_id=2, shares=tuple(forged.items())))
    # a ciphertext for another receiver, relabelled as from its real sender, also fails
    other = dict(deliveries[1].shares)
    other[3] = dict(deliveries[4].shares)[3]  # 3 -> 4 delivered to 1 as 3 -> 1
    with pytest.raises(DecryptionError):
        sites[1].receive(ShareDelivery(round=0, site_id=1, shares=tuple(other.items())))
    assert sites[1].stage is SiteStage.AWAIT_SHARES and sites[2].stage is SiteStage.AWAIT_SHARES
    sites[2].receive(deliveries[2])  # the genuine delivery still works


def test_replayed_messages_from_another_round_are_refused():
    _, _, _, _, adv0 = start(round=0)
    agg1, sites1, _, _, _adv1 = start(round=1)
    with pytest.raises(RoundMismatch):
        agg1.receive(1, adv0[1])
    with pytest.raises(RoundMismatch):
        sites1[1].receive(KeyList(round=0, adverts=tuple(adv0.values())))
    # the old advertisement relabelled as round 1: its signature covers round 0
    with pytest.raises(SignatureError):
        agg1.receive(1, dataclasses.replace(adv0[1], round=1))
    # a masked input recorded in round 0, replayed in round 1 by an outsider
    masked0 = MaskedInput(round=0, site_id=1, vector=np.zeros(CFG.vector_len, np.uint32))
    with pytest.raises(RoundMismatch):
        agg1.receive(1, wire(masked0, CFG))


def test_unsigned_or_wrongly_signed_keys_are_refused():
    agg, sites, _keys, _, adv = start()
    with pytest.raises(SignatureError):
        agg.receive(1, dataclasses.replace(adv[1], signature=b""))
    with pytest.raises(SignatureError):  # signed by a key that is not site 1's identity
        stranger = Ed25519PrivateKey.generate()
        sig = sign_advert(stranger, CFG.federation_id, 0, 1, adv[1].c_pk, adv[1].s_pk)
        agg.receive(1, dataclasses.replace(adv[1], signature=sig))
    with pytest.raises(SignatureError):  # site 2's signature presented for site 1's keys
        agg.receive(1, dataclasses.replace(adv[1], signature=adv[2].signature))
    # the aggregator itself substitutes a key in the list it forwards: each site verifies every signature
    forged = dataclasses.replace(adv[3], s_pk=adv[4].s_pk[::-1])
    with pytest.raises(SignatureError):
        sites[1].receive(KeyList(round=0, adverts=(adv[1], adv[2], forged, adv[4])))
    unsigned = dataclasses.replace(adv[3], signature=b"")
    with pytest.raises(SignatureError):
        sites[1].receive(wire(KeyList(round=0, adverts=(adv[1], adv[2], unsigned, adv[4])), CFG))
    assert sites[1].stage is SiteStage.AWAIT_KEY_LIST
    # nothing was consumed: the genuine messages still make a round
    agg.receive(1, adv[1])
    assert agg.awaiting == {2, 3, 4}


def test_masked_vector_of_the_wrong_length_is_refused():
    agg, sites, _, _, adv = start()
    deliveries = to_shares_stage(agg, sites, adv)
    good = sites[1].receive(deliveries[1])[0]
    for bad in (good.vector[:-1], np.concatenate([good.vector, [1]]).astype(np.uint32)):
        with pytest.raises(VectorLengthError):
            agg.receive(1, MaskedInput(round=0, site_id=1, vector=bad))
    with pytest.raises(VectorLengthError):  # refused at decode, before the payload is even read
        decode(encode(MaskedInput(round=0, site_id=1, vector=np.zeros(CFG.vector_len + 1, np.uint32))),
               max_vector_len=CFG.vector_len)
    with pytest.raises(VectorLengthError):
        agg.receive(1, MaskedInput(round=0, site_id=1, vector=good.vector.astype(np.int64)))
    agg.receive(1, good)


def test_a_site_cannot_speak_for_another():
    agg, _, _, _, adv = start()
    with pytest.raises(AuthenticationError):
        agg.receive(2, adv[1])


def test_corrupted_bytes_never_crash_with_anything_but_a_secagg_error():
    agg, sites, _, _, adv = start()
    deliveries = to_shares_stage(agg, sites, adv)
    data = bytearray(encode(deliveries[1]))
    rng = np.random.default_rng(0)
    for _ in range(300):
        d = bytearray(data)
        for pos in rng.integers(0, len(d), 3):
            d[pos] = int(rng.integers(0, 256))
        try:
            msg = decode(bytes(d), max_vector_len=CFG.vector_len)
            sites[1].receive(msg)
        except SecAggError:
            continue
        assert sites[1].stage is SiteStage.AWAIT_UNMASK  # an alteration that changed nothing that matters
        return
    assert sites[1].stage is SiteStage.AWAIT_SHARES


def test_decoding_errors_are_malformed_message():
    with pytest.raises(MalformedMessage):
        decode(encode(AdvertiseKeys(round=0, site_id=1, c_pk=bytes(32), s_pk=bytes(32), signature=b""))[:-3],
               max_vector_len=None)
