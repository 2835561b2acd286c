"""Whole rounds through both state machines (and the wire format), with dropouts at every stage."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from secagg_harness import STAGES, make_round, random_inputs, run_round

from hemafed.core.secagg import (
    Abandoned,
    AggStage,
    ConsistencyError,
    EncryptedShares,
    KeyList,
    MaskedInput,
    ProtocolStateError,
    RoundAbandoned,
    SecAggConfig,
    SecAggResult,
    SignatureError,
    SignatureList,
    SiteSecAgg,
    SiteStage,
    UnmaskRequest,
    UnmaskShares,
)
from hemafed.core.secagg.quantize import error_bound, quantize


def config(t: int, dim: int = 24, **kw) -> SecAggConfig:
    return SecAggConfig(federation_id="test-fed", threshold=t, dim=dim, n_extras=4, clip=2.0, max_sites=16,
                        max_weight=5000, max_extra=1000, **kw)


def expected_outcome(n: int, t: int, drop: dict[int, str]):
    """(survivors, dropouts) the protocol must produce, or None if it must abandon."""
    ids = set(range(1, n + 1))
    u1 = {i for i in ids if drop.get(i) != "before_keys"}
    u2 = {i for i in u1 if drop.get(i) != "after_keys"}
    u3 = {i for i in u2 if drop.get(i) != "after_shares"}
    signing = {i for i in u3 if drop.get(i) != "after_masked"}
    answering = {i for i in signing if drop.get(i) != "after_signature"}
    if min(len(u1), len(u2), len(u3), len(signing), len(answering)) < t:
        return None
    return tuple(sorted(u3)), tuple(sorted(u2 - u3))


def exact_ring_sum(cfg, inputs, ids, seed=0):
    qs = [quantize(cfg, *inputs[i], rng=np.random.default_rng(seed * 1000 + i)).astype(np.uint64) for i in ids]
    return (np.sum(qs, axis=0) % 2**32).astype(np.uint32)


@settings(max_examples=160, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_output_is_the_exact_sum_of_survivors_despite_dropouts(data):
    n = data.draw(st.integers(3, 12), label="n")
    t = data.draw(st.integers(n // 2 + 1, n), label="t")
    # up to n - t dropouts keep the round alive; one more (or a dropout early enough) abandons it
    k = data.draw(st.integers(1, min(n, n - t + 2)), label="dropouts")  # no-dropout rounds: tested below
    who = data.draw(st.permutations(range(1, n + 1)), label="order")[:k]
    drop = {i: data.draw(st.sampled_from(STAGES), label=f"stage{i}") for i in who}
    cfg = config(t)
    agg, sites, _ = make_round(cfg, n, round=5)
    inputs = random_inputs(cfg, sites, np.random.default_rng(n * 100 + t))
    outcome = run_round(cfg, agg, sites, inputs, drop=drop)
    want = expected_outcome(n, t, drop)
    event("abandoned" if want is None else f"completed, dropouts at {sorted(set(drop.values())) or 'no stage'}")
    if want is None:
        assert isinstance(outcome, Abandoned) and agg.stage is AggStage.ABANDONED
        for i, s in sites.items():
            if i not in drop:  # every site still listening was told; none finished a round that had no result
                assert s.stage in (SiteStage.ABANDONED, SiteStage.DONE, SiteStage.NEW)
        return
    assert isinstance(outcome, SecAggResult)
    assert (outcome.survivors, outcome.dropouts) == want
    assert np.array_equal(outcome.ring_sum, exact_ring_sum(cfg, inputs, outcome.survivors))
    assert outcome.weight_sum == sum(inputs[i][1] for i in outcome.survivors)
    assert np.array_equal(outcome.extras_sum, np.sum([inputs[i][2] for i in outcome.survivors], axis=0))
    truth = sum(inputs[i][1] * np.clip(inputs[i][0].astype(np.float64), -cfg.clip, cfg.clip)
                for i in outcome.survivors)
    err = np.abs(outcome.weighted_sum - truth)
    assert np.all(err <= error_bound(cfg, len(outcome.survivors)) + np.abs(truth) * 2.0**-23)


def test_one_dropout_at_every_stage_in_one_round():
    cfg = config(5)
    agg, sites, _ = make_round(cfg, 9)
    inputs = random_inputs(cfg, sites, np.random.default_rng(9))
    drop = {1: "before_keys", 2: "after_keys", 3: "after_shares", 4: "after_masked"}
    res = run_round(cfg, agg, sites, inputs, drop=drop)
    assert res.survivors == (4, 5, 6, 7, 8, 9) and res.dropouts == (3,)
    assert np.array_equal(res.ring_sum, exact_ring_sum(cfg, inputs, res.survivors))


@pytest.mark.parametrize("n,t", [(3, 2), (5, 3), (7, 7)])
def test_no_dropouts_and_the_average(n, t):
    cfg = config(t)
    agg, sites, _ = make_round(cfg, n)
    inputs = random_inputs(cfg, sites, np.random.default_rng(0), scale=0.1)
    res = run_round(cfg, agg, sites, inputs)
    assert res.survivors == tuple(range(1, n + 1)) and res.dropouts == ()
    mean = sum(w * u.astype(np.float64) for u, w, _ in inputs.values()) / sum(w for _, w, _ in inputs.values())
    assert np.allclose(res.average(), mean, atol=1e-5)
    assert all(s.stage is SiteStage.DONE for s in sites.values())


@pytest.mark.parametrize("stage", STAGES)
def test_fewer_than_t_at_any_stage_abandons_and_reveals_nothing(stage):
    cfg = config(3)
    agg, sites, _ = make_round(cfg, 4)
    inputs = random_inputs(cfg, sites, np.random.default_rng(1))
    seen = []
    real = agg.receive
    agg.receive = lambda sid, msg: (seen.append(msg), real(sid, msg))[1]
    out = run_round(cfg, agg, sites, inputs, drop={1: stage, 2: stage})
    assert isinstance(out, Abandoned), stage
    assert agg.stage is AggStage.ABANDONED and agg._sum is None
    # sites may answer an unmask request that crossed the abandon notice, but fewer than t shares of any
    # secret ever reach the aggregator, so it can reconstruct nothing
    assert sum(isinstance(m, UnmaskShares) for m in seen) < cfg.threshold
    for i in (3, 4):
        assert sites[i].stage in (SiteStage.ABANDONED, SiteStage.DONE)


def test_deadline_advances_with_whoever_answered():
    cfg = config(3)
    agg, sites, _ = make_round(cfg, 4)
    inputs = random_inputs(cfg, sites, np.random.default_rng(2))
    out = []
    for i in (1, 2, 3):  # site 4 never answers
        out += agg.receive(i, sites[i].start(*inputs[i])[0])
    assert out == [] and agg.awaiting == {4}
    out = agg.deadline_passed()
    assert {o.to for o in out} == {1, 2, 3} and all(isinstance(o.message, KeyList) for o in out)
    assert len(out[0].message.adverts) == 3
    with pytest.raises(ProtocolStateError):  # the late site is a dropout now
        agg.receive(4, sites[4].start(*inputs[4])[0])


def test_out_of_order_and_duplicate_messages_are_refused_without_harm():
    cfg = config(2)
    agg, sites, _ = make_round(cfg, 3)
    inputs = random_inputs(cfg, sites, np.random.default_rng(3))
    adv = {i: s.start(*inputs[i])[0] for i, s in sites.items()}
    with pytest.raises(ProtocolStateError):
        sites[1].start(*inputs[1])
    with pytest.raises(ProtocolStateError):  # a masked input during key collection
        agg.receive(1, MaskedInput(round=0, site_id=1, vector=np.zeros(cfg.vector_len, np.uint32)))
    with pytest.raises(ProtocolStateError):  # a site receives an unmask request before anything else
        sites[1].receive(UnmaskRequest(round=0, survivors=(1, 2), dropouts=()))
    agg.receive(1, adv[1])
    with pytest.raises(ProtocolStateError):
        agg.receive(1, adv[1])
    agg.receive(2, adv[2])
    outs = agg.receive(3, adv[3])
    assert agg.stage is AggStage.COLLECT_SHARES
    with pytest.raises(ProtocolStateError):  # a site may not send what only the aggregator sends
        agg.receive(1, outs[0].message)
    # the refused messages changed nothing: the round still completes
    queue = list(outs)
    while queue:
        to, msg = queue.pop(0)
        for reply in sites[to].receive(msg):
            queue += agg.receive(to, reply)
    assert isinstance(agg.outcome, SecAggResult) and agg.outcome.survivors == (1, 2, 3)


def _drive_to_unmask(n=4, t=3):
    cfg = config(t)
    agg, sites, _ = make_round(cfg, n)
    inputs = random_inputs(cfg, sites, np.random.default_rng(4))
    queue = []
    for i, s in sites.items():
        queue += agg.receive(i, s.start(*inputs[i])[0])
    while agg.stage is not AggStage.COLLECT_SIGNATURES:
        to, msg = queue.pop(0)
        for reply in sites[to].receive(msg):
            queue += agg.receive(to, reply)
    return cfg, agg, sites, queue


def _signature_list(sites, survivors, dropouts, signers=None):
    """What an aggregator would forward after collecting the survivors' signatures over these lists."""
    sigs = []
    for i in signers or survivors:
        (reply,) = sites[i].receive(UnmaskRequest(round=0, survivors=survivors, dropouts=dropouts))
        sigs.append((i, reply.signature))
    return SignatureList(round=0, survivors=survivors, dropouts=dropouts, signatures=tuple(sigs))


@pytest.mark.parametrize("survivors,dropouts,why", [
    ((1, 2, 3), (3, 4), "overlap"),
    ((1, 2, 3), (), "differ"),
    ((1, 2, 3, 4, 5), (), "differ"),
    ((2, 3, 4), (1,), "not listed as a survivor"),
    ((1, 2), (3, 4), "fewer than t"),
])
def test_site_checks_the_survivor_and_dropout_lists(survivors, dropouts, why):
    _, _, sites, _ = _drive_to_unmask()
    with pytest.raises(ConsistencyError, match=why):
        sites[1].receive(UnmaskRequest(round=0, survivors=survivors, dropouts=dropouts))
    assert sites[1].stage is SiteStage.AWAIT_UNMASK


def test_site_never_reveals_both_shares_of_one_site():
    _, _, sites, _queue = _drive_to_unmask()
    first = sites[1].receive(_signature_list(sites, (1, 2, 3, 4), ()))
    assert {u for u, _ in first[0].self_mask_shares} == {1, 2, 3, 4}
    # a second request now calling site 4 a dropout would hand out its mask key as well: refused
    with pytest.raises(ProtocolStateError):
        sites[1].receive(UnmaskRequest(round=0, survivors=(1, 2, 3), dropouts=(4,)))
    assert sites[1].revealed_keys == frozenset()
    # and the guard holds independently of the stage check
    fresh = _drive_to_unmask()[2]
    fresh[2].revealed_keys = frozenset({4})
    with pytest.raises(ConsistencyError, match="both shares"):
        fresh[2].receive(UnmaskRequest(round=0, survivors=(1, 2, 3, 4), dropouts=()))


def test_consistency_check_reveals_nothing_until_t_sites_signed_the_same_lists():
    _, _, sites, _ = _drive_to_unmask(n=4, t=3)
    honest = _signature_list(sites, (1, 2, 3, 4), (), signers=(1, 2, 3, 4))
    # an aggregator telling site 1 that site 4 dropped, while the others were told it survived, cannot show
    # site 1 t signatures over the lists it was sent
    sites2 = _drive_to_unmask(n=4, t=3)[2]
    (own,) = sites2[1].receive(UnmaskRequest(round=0, survivors=(1, 2, 3), dropouts=(4,)))
    with pytest.raises(ConsistencyError, match="other survivor and dropout lists"):
        sites2[1].receive(honest)
    relabelled = SignatureList(round=0, survivors=(1, 2, 3), dropouts=(4,),
                               signatures=((1, own.signature), *(p for p in honest.signatures if p[0] in (2, 3))))
    with pytest.raises(SignatureError):
        sites2[1].receive(relabelled)
    assert sites2[1].stage is SiteStage.AWAIT_SIGNATURES and sites2[1].revealed_self == frozenset()
    # too few signers, a signer outside the survivors, or its own signature missing: refused
    with pytest.raises(ConsistencyError, match="threshold"):
        sites[1].receive(SignatureList(round=0, survivors=(1, 2, 3, 4), dropouts=(),
                                       signatures=honest.signatures[:2]))
    with pytest.raises(ConsistencyError, match="omits this site"):
        sites[1].receive(SignatureList(round=0, survivors=(1, 2, 3, 4), dropouts=(),
                                       signatures=honest.signatures[1:]))
    assert sites[1].stage is SiteStage.AWAIT_SIGNATURES
    shares = sites[1].receive(honest)[0]
    assert isinstance(shares, UnmaskShares) and sites[1].stage is SiteStage.DONE


def test_aggregator_refuses_a_signature_over_other_lists():
    _cfg, agg, sites, queue = _drive_to_unmask(n=4, t=3)
    to, request = queue[0]
    forged = sites[to].receive(UnmaskRequest(round=0, survivors=request.survivors[:-1],
                                             dropouts=request.survivors[-1:]))[0]
    with pytest.raises(SignatureError):
        agg.receive(to, forged)
    assert agg.stage is AggStage.COLLECT_SIGNATURES and to in agg.awaiting


def test_site_refuses_a_round_with_a_key_outside_its_roster():
    cfg = config(3)
    keys = {i: Ed25519PrivateKey.generate() for i in range(1, 5)}
    pubs = {i: k.public_key() for i, k in keys.items()}
    roster = [p.public_bytes_raw() for p in pubs.values()]
    SiteSecAgg(cfg, 0, 1, keys[1], pubs, roster=roster)  # everyone on the roster: accepted
    planted = dict(pubs)
    planted[3] = Ed25519PrivateKey.generate().public_key()  # the aggregator substitutes a key of its own
    with pytest.raises(ConsistencyError, match="roster") as err:
        SiteSecAgg(cfg, 0, 1, keys[1], planted, roster=roster)
    assert err.value.site_id == 3


def test_site_checks_key_list():
    cfg = config(3)
    _agg, sites, _ = make_round(cfg, 4)
    inputs = random_inputs(cfg, sites, np.random.default_rng(5))
    adv = {i: s.start(*inputs[i])[0] for i, s in sites.items()}
    with pytest.raises(ConsistencyError, match="omits"):
        sites[1].receive(KeyList(round=0, adverts=(adv[2], adv[3], adv[4])))
    with pytest.raises(ConsistencyError, match="threshold"):
        sites[1].receive(KeyList(round=0, adverts=(adv[1], adv[2])))
    sites[1].receive(KeyList(round=0, adverts=(adv[1], adv[2], adv[3])))  # a valid list still works after refusals
    assert sites[1].stage is SiteStage.AWAIT_SHARES


def test_aggregator_refuses_shares_not_addressed_to_the_key_list():
    cfg = config(2)
    agg, sites, _ = make_round(cfg, 3)
    inputs = random_inputs(cfg, sites, np.random.default_rng(6))
    outs = []
    for i, s in sites.items():
        outs += agg.receive(i, s.start(*inputs[i])[0])
    shares = sites[1].receive(outs[0].message)[0]
    with pytest.raises(ConsistencyError):
        agg.receive(1, EncryptedShares(round=0, site_id=1, shares=shares.shares[:1]))
    agg.receive(1, shares)


def test_abandon_notice_makes_site_forget():
    cfg = config(2)
    _, sites, _ = make_round(cfg, 3)
    inputs = random_inputs(cfg, sites, np.random.default_rng(7))
    sites[1].start(*inputs[1])
    assert sites[1].receive(RoundAbandoned(round=0, reason="x")) == []
    assert sites[1].stage is SiteStage.ABANDONED and sites[1]._input is None and sites[1]._s_sk is None
    with pytest.raises(ProtocolStateError):
        sites[1].receive(KeyList(round=0, adverts=()))


def test_a_late_masked_input_is_refused_once_the_site_counts_as_dropped():
    cfg = config(3)
    agg, sites, _ = make_round(cfg, 4)
    inputs = random_inputs(cfg, sites, np.random.default_rng(8))
    queue = []
    for i, s in sites.items():
        queue += agg.receive(i, s.start(*inputs[i])[0])
    late = None
    while queue:
        to, msg = queue.pop(0)
        for reply in sites[to].receive(msg):
            if isinstance(reply, MaskedInput) and to == 4:
                late = reply  # held back by a slow link
                continue
            queue += agg.receive(to, reply)
        if not queue and agg.stage is AggStage.COLLECT_MASKED:
            queue += agg.deadline_passed()
            # its pairwise key will be reconstructed: accepting its masked input now would unmask it
            with pytest.raises(ProtocolStateError):
                agg.receive(4, late)
    assert agg.outcome.survivors == (1, 2, 3) and agg.outcome.dropouts == (4,)


def test_answers_stay_valid_after_their_sender_disconnects():
    cfg = config(3)
    agg, sites, _ = make_round(cfg, 4)
    inputs = random_inputs(cfg, sites, np.random.default_rng(10))
    queue = []
    for i, s in sites.items():
        queue += agg.receive(i, s.start(*inputs[i])[0])
    while queue:
        to, msg = queue.pop(0)
        for reply in sites[to].receive(msg):
            queue += agg.receive(to, reply)
            # site 1 hangs up right after its masked input, site 2 right after its unmask shares
            if (to, type(reply)) in ((1, MaskedInput), (2, UnmaskShares)):
                queue += agg.site_dropped(to)
                queue = [o for o in queue if o.to != to]
    assert isinstance(agg.outcome, SecAggResult), agg.outcome
    assert agg.outcome.survivors == (1, 2, 3, 4)
    assert np.array_equal(agg.outcome.ring_sum, exact_ring_sum(cfg, inputs, (1, 2, 3, 4)))
