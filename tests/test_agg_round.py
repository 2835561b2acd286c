"""The aggregator's federation machine (core/rounds/agg_round.py) without sockets, clocks or files:
joins and plan answers, plain and secure rounds driven by real site-side secure-aggregation
machines, declines, time-outs, and a round that waits until it is recorded."""

from __future__ import annotations

import numpy as np
import pytest

from hemafed.core import secagg
from hemafed.core.learning.server_opt import make_server_optimizer
from hemafed.core.rounds import agg_round as R
from hemafed.core.rounds.calibration_sums import CALIBRATION_GRID, CELL_SCORE_EDGES
from hemafed.core.rounds.plan import FederationPlan
from hemafed.core.trust.identity import IdentityKey, parse_public_line

DIM = 6
K = 2  # classes: extras are K*K confusion counts, then the calibration sums


def _plan(**kw) -> FederationPlan:
    base = dict(federation_id="t", model="cnn4_28",
                algorithm="fedavg", dp_mode="local", noise_multiplier=0.0, classes=("a", "b"), rounds=2, threshold=2,
                min_sites=2,
                max_sites=3, max_weight=1000, update_clip=1.0, join_timeout_s=10.0, train_timeout_s=100.0,
                stage_timeout_s=10.0)
    return FederationPlan(**(base | kw))


def _machine(plan: FederationPlan, n: int = 3) -> tuple[R.FederationMachine, dict[str, IdentityKey]]:
    ids = {f"s{i}": IdentityKey.generate() for i in range(1, n + 1)}
    m = R.FederationMachine(plan, {s: k.public_line() for s, k in ids.items()}, np.zeros(DIM, np.float32),
                            make_server_optimizer("fedavg", 1.0))
    return m, ids


def _of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def _join(m: R.FederationMachine, site: str, now: float = 0.0) -> list:
    out = m.connected(site, now)
    assert _of(out, R.Send)[0].type == R.PLAN
    return out + m.receive(R.Inbound(site, R.PLAN_ACCEPT, 0, {"digest": m.plan.digest()}), now)


def _plain_update(site: str, rnd: int, update: np.ndarray, weight: int) -> R.Inbound:
    counts = np.array([weight, 0, 0, 0], "<i8")
    return R.Inbound(site, R.PLAIN_UPDATE, rnd, {"weight": weight},
                     (np.asarray(update * weight, "<f4").tobytes(), counts.tobytes()))


def test_plain_round_averages_by_weight_and_waits_to_be_recorded() -> None:
    m, _ = _machine(_plan(secagg=False))
    m.start(0.0)
    _join(m, "s1")
    _join(m, "s2")
    assert m.stage is R.Stage.WAITING  # the first round waits for every allowed site...
    out = _join(m, "s3")
    (start,) = [a for a in _of(out, R.Broadcast) if a.type == R.ROUND_START]  # ...and starts once all are in
    assert start.sites == ("s1", "s2", "s3") and m.round_in_progress == 1
    m.receive(_plain_update("s1", 1, np.full(DIM, 0.1), 10), 1.0)
    m.receive(R.Inbound("s2", R.DECLINE, 1, {"reason": "budget\nexhausted"}), 1.0)
    out = m.receive(_plain_update("s3", 1, np.full(DIM, 0.4), 30), 2.0)
    (finished,) = _of(out, R.RoundFinished)
    outcome = finished.outcome
    assert outcome.status == "completed" and outcome.survivors == ["s1", "s3"] and outcome.declined == ["s2"]
    np.testing.assert_allclose(outcome.mean_update, (0.1 * 10 + 0.4 * 30) / 40, rtol=1e-6)
    np.testing.assert_allclose(m.weights, outcome.mean_update)  # fedavg, lr 1
    # nothing starts before the round is recorded, however much time passes
    assert m.stage is R.Stage.RECORDING and m.tick(1e6) == [] and m.next_deadline is None
    out = m.recorded(1, 3.0)
    assert [a.type for a in _of(out, R.Broadcast)] == [R.ROUND_END, R.ROUND_START]  # round 2: min_sites ready


def test_a_refused_plan_and_the_join_timeout() -> None:
    m, _ = _machine(_plan(secagg=False))
    m.start(0.0)
    m.connected("s3", 0.0)
    m.receive(R.Inbound("s3", R.PLAN_REJECT, 0, {"reasons": ["too\nmany rounds\x1b[2K"]}), 0.0)
    assert m.rejected == {"s3": [ascii("too\nmany rounds\x1b[2K")]}  # kept escaped (the driver uses safe_text)
    _join(m, "s1")
    out = _join(m, "s2")  # all who did not refuse are in: go
    assert [a.type for a in _of(out, R.Broadcast)] == [R.ROUND_START]
    out = m.tick(50.0)
    assert m.stage is R.Stage.ROUND and out == []
    out = m.tick(101.0)  # train_timeout_s passed without an update
    (finished,) = _of(out, R.RoundFinished)
    assert finished.outcome.status == "abandoned" and finished.outcome.dropouts == ["s1", "s2"]
    np.testing.assert_array_equal(m.weights, np.zeros(DIM))


def _preparing(site: str, done: int, total: int, eta: float | None = None) -> R.Inbound:
    body: dict = {"done": done, "total": total} | ({"eta_s": eta} if eta is not None else {})
    return R.Inbound(site, R.PREPARING, 0, body)


def test_the_first_round_waits_for_a_site_still_preparing_up_to_the_plans_deadline() -> None:
    m, _ = _machine(_plan(secagg=False, min_sites=2, join_timeout_s=10.0, prepare_timeout_s=100.0))
    m.start(0.0)
    _join(m, "s1")
    _join(m, "s2")
    m.connected("s3", 0.0)
    out = m.receive(_preparing("s3", 100, 1000, 90.0), 1.0)
    assert [a.stage for a in _of(out, R.Status)] == ["waiting for sites (1 preparing)"]
    assert m.preparing == {"s3": (100, 1000, 90.0)}
    # the join time-out passes: two sites would be enough, but s3 is connected and preparing, so round 1 waits
    assert _of(m.tick(11.0), R.Broadcast) == [] and m.stage is R.Stage.WAITING and m.next_deadline == 100.0
    m.receive(_preparing("s3", 900, 1000, 9.0), 50.0)
    out = m.receive(R.Inbound("s3", R.PLAN_ACCEPT, 0, {"digest": m.plan.digest()}), 60.0)
    (start,) = [a for a in _of(out, R.Broadcast) if a.type == R.ROUND_START]
    assert start.sites == ("s1", "s2", "s3") and m.preparing == {}


def test_a_site_preparing_past_the_deadline_or_gone_no_longer_holds_the_first_round() -> None:
    for lost in (False, True):
        m, _ = _machine(_plan(secagg=False, min_sites=2, join_timeout_s=10.0, prepare_timeout_s=100.0))
        m.start(0.0)
        _join(m, "s1")
        _join(m, "s2")
        m.connected("s3", 0.0)
        m.receive(_preparing("s3", 1, 1000), 1.0)
        if lost:
            out = m.disconnected("s3", 20.0) + m.tick(20.0)
        else:
            assert _of(m.tick(99.0), R.Broadcast) == []
            out = m.tick(100.0)
        (start,) = [a for a in _of(out, R.Broadcast) if a.type == R.ROUND_START]
        assert start.sites == ("s1", "s2")
        if not lost:  # s3 is connected but still preparing: it hears that round 1 goes on without it
            (status,) = [a for a in _of(out, R.Send) if a.type == R.STATUS]
            assert status.site == "s3" and status.body == {"rounds": 2, "participants": 2, "reason": "preparing"}


def test_progress_after_a_site_said_it_was_ready_is_ignored() -> None:
    m, _ = _machine(_plan(secagg=False))
    m.start(0.0)
    _join(m, "s1")
    assert m.receive(_preparing("s1", 5, 10), 1.0) == [] and m.preparing == {}


def test_round_two_goes_on_with_min_sites_after_the_join_timeout() -> None:
    m, _ = _machine(_plan(secagg=False, min_sites=2))
    m.start(0.0)
    for s in ("s1", "s2", "s3"):
        _join(m, s)
    for s in ("s1", "s2", "s3"):
        m.receive(_plain_update(s, 1, np.full(DIM, 0.1), 5), 1.0)
    m.disconnected("s3", 1.5)
    out = m.recorded(1, 2.0)
    assert [a.type for a in _of(out, R.Broadcast)] == [R.ROUND_END, R.ROUND_START]
    assert _of(out, R.Broadcast)[1].sites == ("s1", "s2")


def test_a_plain_update_of_the_wrong_length_is_refused_and_the_site_dropped() -> None:
    m, _ = _machine(_plan(secagg=False))
    m.start(0.0)
    for s in ("s1", "s2", "s3"):
        _join(m, s)
    bad = R.Inbound("s2", R.PLAIN_UPDATE, 1, {"weight": 3}, (b"\x00" * 8, np.zeros(4, "<i8").tobytes()))
    (reject,) = _of(m.receive(bad, 1.0), R.Reject)
    assert reject.site == "s2" and reject.code == "malformed"
    m.receive(_plain_update("s1", 1, np.full(DIM, 0.2), 4), 1.0)
    (finished,) = _of(m.receive(_plain_update("s3", 1, np.full(DIM, 0.2), 4), 1.0), R.RoundFinished)
    assert finished.outcome.survivors == ["s1", "s3"] and finished.outcome.dropouts == ["s2"]


def _secure_round(m: R.FederationMachine, keys: dict[str, IdentityKey], updates: dict[str, np.ndarray],
                  weights: dict[str, int], drop_after_keys: str | None = None,
                  sink: list | None = None) -> R.RoundOutcome:
    """Drive a secure round through the machine with real site-side secure-aggregation machines."""
    rnd = m.round
    cfg = m.plan.secagg_config(DIM)
    joined = m.tick(0.0)
    for s in keys:
        joined += _join(m, s)
    if sink is not None:
        sink += joined
    start = [a for a in _of(joined, R.Broadcast) if a.type == R.ROUND_START]
    assert start, "the round did not start"
    pubs = {int(i): parse_public_line(line) for i, line in start[0].body["participants"].items()}
    sites = {s: secagg.SiteSecAgg(cfg, rnd, m.site_ids[s], keys[s].private_key, pubs,
                                  rng=np.random.default_rng(m.site_ids[s])) for s in keys}
    queue: list = []
    for s, site in sites.items():
        extras = np.zeros(K * K + len(CALIBRATION_GRID) + len(CELL_SCORE_EDGES), np.int64)  # counts, sums, tails
        extras[0] = weights[s]
        for msg in site.start(updates[s], weights[s], extras):
            queue.append(R.Inbound(s, R.SECAGG, rnd, {}, (secagg.encode(msg),)))
    now, gone = 1.0, set()
    while queue:
        item = queue.pop(0)
        if isinstance(item, R.Inbound):
            if item.site in gone:
                continue
            out = m.receive(item, now)
        else:
            out = item
        if sink is not None:
            sink += out
        for action in out:
            if isinstance(action, R.RoundFinished):
                return action.outcome
            if isinstance(action, R.Send) and action.site not in gone:
                msg = secagg.decode(action.blobs[0], max_vector_len=cfg.vector_len)
                if drop_after_keys == action.site and isinstance(msg, secagg.ShareDelivery):
                    gone.add(action.site)
                    queue.append(m.disconnected(action.site, now))
                    continue
                for reply in sites[action.site].receive(msg):
                    queue.append(R.Inbound(action.site, R.SECAGG, rnd, {}, (secagg.encode(reply),)))
    raise AssertionError("the round did not finish")


def test_secure_round_through_the_machine_with_a_dropout() -> None:
    m, keys = _machine(_plan(secagg=True))
    m.start(0.0)
    updates = {"s1": np.full(DIM, 0.1, np.float32), "s2": np.full(DIM, -0.2, np.float32),
               "s3": np.full(DIM, 0.3, np.float32)}
    weights = {"s1": 10, "s2": 20, "s3": 30}
    outcome = _secure_round(m, keys, updates, weights, drop_after_keys="s3")
    assert outcome.status == "completed" and outcome.survivors == ["s1", "s2"] and outcome.dropouts == ["s3"]
    expected = (0.1 * 10 - 0.2 * 20) / 30
    np.testing.assert_allclose(outcome.mean_update, expected, atol=1e-4)
    assert outcome.confusion == [[30, 0], [0, 0]]


def test_a_garbage_secagg_message_drops_only_its_sender() -> None:
    m, keys = _machine(_plan(secagg=True))
    m.start(0.0)
    for s in keys:
        _join(m, s)
    out = m.receive(R.Inbound("s2", R.SECAGG, 1, {}, (b"HFSA\x01\x02\x00\x00\x00{}",)), 1.0)
    (reject,) = _of(out, R.Reject)
    assert reject.site == "s2" and reject.code == "malformed"
    assert m.stage is R.Stage.ROUND  # 2 of 3 remain, t = 2: the round goes on


def test_unknown_site_is_a_driver_bug_not_a_peer_fault() -> None:
    m, _ = _machine(_plan(secagg=False))
    with pytest.raises(KeyError):
        m.connected("mallory", 0.0)


def test_everything_the_machine_sends_fits_the_schema_sites_can_check() -> None:
    """network/schema.py declares the aggregator → site messages too; the machine's output must fit it."""
    from hemafed.network import schema

    m, keys = _machine(_plan(secagg=True, rounds=1))
    sent: list = [*m.start(0.0)]
    outcome = _secure_round(m, keys, {s: np.full(DIM, 0.1, np.float32) for s in keys}, dict.fromkeys(keys, 5),
                            sink=sent)
    assert outcome.status == "completed"
    sent += m.recorded(1, 5.0)
    schemas = schema.aggregator_schemas(DIM, K * K + len(CALIBRATION_GRID) + len(CELL_SCORE_EDGES))
    kinds = set()
    for action in sent:
        if isinstance(action, R.Send | R.Broadcast):
            schema.check_body(schemas, action.type, dict(action.body), action.blobs)
            kinds.add(action.type)
    assert kinds == {R.PLAN, R.ROUND_START, R.SECAGG, R.ROUND_END, R.DONE}
    # the final model comes with the federation's validation images per class: the last round's confusion row sums
    (done,) = [a for a in sent if isinstance(a, R.Broadcast) and a.type == R.DONE]
    assert done.body["validation_classes"] == np.asarray(outcome.confusion).sum(axis=1).tolist()
    assert sum(done.body["validation_classes"]) > 0
