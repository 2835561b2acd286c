"""The site's round state machine, fed directly: no sockets, no threads, no training."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from hemafed.core import secagg
from hemafed.core.learning.models import model_problems
from hemafed.core.rounds import site_round as sr
from hemafed.core.rounds.plan import FederationPlan, SiteBounds
from hemafed.core.rounds.site_events import (
    PlanAnswered,
    PlanReceived,
    PrepareProgress,
    RoundFinished,
    RoundStarted,
    RoundWithoutThisSite,
    SiteFailed,
    StageChanged,
)
from hemafed.core.trust.identity import IdentityKey
from hemafed.core.trust.text import safe_list, safe_text
from hemafed.network import protocol as P

N_PARAMS = 12


@dataclass
class Msg:
    type: str
    round: int = 0
    body: dict[str, Any] = field(default_factory=dict)
    blobs: tuple[bytes, ...] = ()


ME = IdentityKey.generate()
PEER = IdentityKey.generate()


def make_plan(**change: Any) -> FederationPlan:
    settings = {"federation_id": "fed", "model": "cnn4_28",
                "algorithm": "fedavg", "dp_mode": "local", "noise_multiplier": 0.0, "rounds": 2, "threshold": 2,
                "min_sites": 2,
                "max_sites": 4, "batch_size": 8, "max_weight": 1000}
    return FederationPlan(**(settings | change))


def plan_msg(plan: FederationPlan, site_id: int = 1, **body: Any) -> Msg:
    return Msg(sr.PLAN, 0, {"plan": plan.to_dict(), "digest": plan.digest(), "site_id": site_id} | body)


def weights(value: float = 0.5) -> bytes:
    return np.full(N_PARAMS, value, dtype="<f4").tobytes()


def round_start(rnd: int, participants: dict[str, str] | None = None, blob: bytes | None = None) -> Msg:
    parts = participants if participants is not None else {"1": ME.public_line(), "2": PEER.public_line()}
    return Msg(sr.ROUND_START, rnd, {"participants": parts}, (weights() if blob is None else blob,))


def machine(auto_accept: bool = True, bounds: SiteBounds | None = None, federation: str | None = "fed") -> sr.SiteRound:
    return sr.SiteRound(bounds or SiteBounds(), identity=ME.private_key, plan_problems=model_problems,
                        federation=federation, auto_accept=auto_accept)


def events(actions: list[sr.Action]) -> list[Any]:
    return [a.event for a in actions if isinstance(a, sr.Emit)]


def sends(actions: list[sr.Action]) -> list[sr.Send]:
    return [a for a in actions if isinstance(a, sr.Send)]


def joined(plan: FederationPlan | None = None, **kw: Any) -> sr.SiteRound:
    """A machine that has accepted `plan` (ε spent 0.5 so far)."""
    m = machine(**kw)
    plan = plan or make_plan()
    assert isinstance(m.receive(plan_msg(plan))[0], sr.Prepare)
    actions = m.prepared(sr.PrivacySettings(1.2, 0.1, 5, 1e-5), n_params=N_PARAMS, epsilon_spent=0.5,
                         epsilon_per_round=(1.0, 2.0))
    assert isinstance(actions[-1], sr.Featurize) and m.phase is sr.Phase.FEATURIZING
    m.featurized()
    assert m.phase is sr.Phase.READY
    return m


def prepared_and_featurized(m: sr.SiteRound, **kw: Any) -> list[sr.Action]:
    """`prepared()` then, when the machine asks for it, `featurized()`: the actions of both."""
    actions = m.prepared(None, n_params=N_PARAMS, **kw)
    return actions + (m.featurized() if isinstance(actions[-1], sr.Featurize) else [])


def outcome(eps: float | None = 1.0, weight: int = 40, secure: bool = True) -> sr.TrainOutcome:
    """What a site trainer hands back: the ring input for a secure plan (quantized as the trainer does), the
    update for a plain one."""
    update = np.linspace(-0.1, 0.1, N_PARAMS, dtype=np.float32)
    confusion = np.eye(8, dtype=np.int64)
    if not secure:
        return sr.TrainOutcome(1, confusion, weight, update=update, epsilon_spent=eps)
    cfg = make_plan().secagg_config(N_PARAMS)
    extras = np.concatenate([confusion.reshape(-1), np.zeros(cfg.n_extras - confusion.size, np.int64)])
    ring = secagg.quantize.quantize(cfg, update, weight, extras)  # confusion counts, then calibration sums
    return sr.TrainOutcome(1, confusion, weight, ring=ring, epsilon_spent=eps)


def snapshot(m: sr.SiteRound) -> dict[str, Any]:
    state = {k: v for k, v in vars(m).items() if k not in ("secagg", "_identity", "_plan_problems")}
    state["secagg_stage"] = m.secagg.stage if m.secagg is not None else None
    return copy.deepcopy(state)


def test_message_names_agree_with_the_protocol() -> None:
    for name in ("PLAN", "PLAN_ACCEPT", "PLAN_REJECT", "ROUND_START", "DECLINE", "SECAGG", "PLAIN_UPDATE",
                 "ROUND_END", "DONE"):
        assert getattr(sr, name) == getattr(P, name)


def test_an_acceptable_plan_is_prepared_then_accepted_headless() -> None:
    m = machine()
    plan = make_plan()
    (prepare,) = m.receive(plan_msg(plan, site_id=3))
    assert isinstance(prepare, sr.Prepare) and prepare.plan == plan and m.phase is sr.Phase.PREPARING
    privacy = sr.PrivacySettings(1.2, 0.1, 5, 1e-5)
    actions = m.prepared(privacy, n_params=N_PARAMS, epsilon_spent=0.0, epsilon_per_round=(1.0, 2.0))
    received, answered, stage = events(actions)
    assert received == PlanReceived(plan, privacy, (), (1.0, 2.0), awaiting_answer=False)
    assert answered == PlanAnswered(True) and stage == StageChanged(0, "preparing")
    assert sends(actions) == [] and actions[-1] == sr.Featurize(plan) and m.phase is sr.Phase.FEATURIZING
    # while it prepares, the aggregator hears how far it got; when it is done, that it is ready
    progress = m.preparing(120, 1200, 33.33)
    assert sends(progress) == [sr.Send(sr.PREPARING, 0, {"done": 120, "total": 1200, "eta_s": 33.3})]
    assert events(progress) == [PrepareProgress(120, 1200, 33.3)]
    with pytest.raises(sr.MessageRefused):
        m.receive(round_start(1))  # not ready yet
    actions = m.featurized()
    assert sends(actions) == [sr.Send(sr.PLAN_ACCEPT, 0, {"digest": plan.digest()})]
    assert events(actions) == [StageChanged(0, "waiting")]
    assert m.phase is sr.Phase.READY and m.site_id == 3


def test_a_preparation_that_fails_refuses_the_plan_with_the_reason() -> None:
    m = machine()
    m.receive(plan_msg(make_plan()))
    m.prepared(None, n_params=N_PARAMS)
    actions = m.featurize_failed("OSError: disk\nfull")
    (reject,) = sends(actions)
    assert reject.type == sr.PLAN_REJECT and "disk\\x0afull" in reject.body["reasons"][0]
    assert isinstance(events(actions)[-1], SiteFailed) and actions[-1] == sr.Stop()


def test_progress_after_a_lost_connection_goes_nowhere() -> None:
    m = machine()
    m.receive(plan_msg(make_plan()))
    m.prepared(None, n_params=N_PARAMS)
    m.connection_lost("gone")
    assert m.preparing(5, 10, None) == [] and m.featurized() == []  # the plan comes again after the reconnect


def test_the_operator_decides_once_per_plan() -> None:
    m = machine(auto_accept=False)
    plan = make_plan()
    m.receive(plan_msg(plan))
    actions = m.prepared(None, n_params=N_PARAMS)
    assert events(actions)[0].awaiting_answer and isinstance(actions[-1], sr.AskOperator)
    # the aggregator hears that this site is coming (a person reads the plan): it holds the first round
    assert sends(actions) == [sr.Send(sr.PREPARING, 0, {"done": 0, "total": 0})] and m.phase is sr.Phase.DECIDING
    with pytest.raises(sr.MessageRefused):
        m.receive(round_start(1))  # nothing happens while the operator thinks
    assert m.answer(True)[-1] == sr.Featurize(plan)
    assert sends(m.featurized()) == [sr.Send(sr.PLAN_ACCEPT, 0, {"digest": plan.digest()})]
    # after a reconnect the same plan comes again: accepted without asking twice
    m.connected()
    m.receive(plan_msg(plan))
    actions = prepared_and_featurized(m)
    assert not events(actions)[0].awaiting_answer and sends(actions)[0].type == sr.PLAN_ACCEPT


def test_the_operator_can_decline() -> None:
    m = machine(auto_accept=False)
    m.receive(plan_msg(make_plan()))
    m.prepared(None, n_params=N_PARAMS)
    actions = m.answer(False, "not\nnow")
    assert sends(actions) == [sr.Send(sr.PLAN_REJECT, 0, {"reasons": ["not\\x0anow"]})]
    assert events(actions) == [PlanAnswered(False, ("not\\x0anow",))]
    assert actions[-1] == sr.Stop("stopped") and m.phase is sr.Phase.STOPPED


@pytest.mark.parametrize(("plan", "bounds", "reason"), [
    (make_plan(dp=False), SiteBounds(), "differential privacy off"),
    (make_plan(rounds=1500), SiteBounds(), "1500 rounds exceed"),
    (make_plan(threshold=2), SiteBounds(min_threshold=3), "threshold t=2"),
    (make_plan(federation_id="other"), SiteBounds(), "not the configured"),
    (make_plan(input_size=32), SiteBounds(), "does not take 32-pixel input"),
    (make_plan(max_weight=10**30), SiteBounds(), "max_weight is out of range"),
])
def test_a_plan_outside_the_bounds_is_refused_without_asking(plan: FederationPlan, bounds: SiteBounds,
                                                             reason: str) -> None:
    m = machine(auto_accept=False, bounds=bounds)
    actions = m.receive(plan_msg(plan))
    (reject,) = sends(actions)
    assert reject.type == sr.PLAN_REJECT and any(reason in r for r in reject.body["reasons"])
    received, answered, failed = events(actions)
    assert received.problems == tuple(reject.body["reasons"]) and not received.awaiting_answer
    assert not answered.accepted
    assert isinstance(failed, SiteFailed) and failed.fatal and "bounds" in failed.what_to_do
    assert actions[-1] == sr.Stop() and m.phase is sr.Phase.STOPPED


@pytest.mark.parametrize("body", [
    {"plan": 7, "digest": "x", "site_id": 1},
    {"plan": {"rounds": "many"}, "digest": "x", "site_id": 1},
    {"plan": {"nonsense": 1}, "digest": "x", "site_id": 1},
    {"plan": make_plan().to_dict(), "digest": "0" * 16, "site_id": 1},
    {"plan": make_plan().to_dict(), "digest": make_plan().digest(), "site_id": True},
    {"plan": make_plan().to_dict(), "digest": make_plan().digest(), "site_id": 10**400},
    {"plan": make_plan().to_dict(), "digest": make_plan().digest(), "site_id": 99},
])
def test_a_malformed_plan_is_refused_with_a_reason(body: dict[str, Any]) -> None:
    m = machine()
    actions = m.receive(Msg(sr.PLAN, 0, body))
    assert sends(actions)[0].type == sr.PLAN_REJECT and sends(actions)[0].body["reasons"]
    assert any(isinstance(e, SiteFailed) and e.fatal for e in events(actions)) and m.phase is sr.Phase.STOPPED


def test_a_problem_found_while_preparing_refuses_the_plan() -> None:
    m = machine()
    m.receive(plan_msg(make_plan()))
    actions = m.prepared(None, n_params=0, problems=["only 3 training images"], what_to_do="add images")
    assert sends(actions)[0].body == {"reasons": ["only 3 training images"]}
    assert [e for e in events(actions) if isinstance(e, SiteFailed)] == [
        SiteFailed("refused the federation's plan: only 3 training images", True, "add images", code="data")]


def test_a_plain_round_trains_sends_and_finishes() -> None:
    m = joined(make_plan(secagg=False, dp=False), bounds=SiteBounds(require_dp=False, require_secagg=False))
    actions = m.receive(round_start(1))
    assert events(actions) == [RoundStarted(1, 2, 2), StageChanged(1, "training")]
    (train,) = [a for a in actions if isinstance(a, sr.Train)]
    assert train.round == 1 and np.array_equal(train.weights, np.full(N_PARAMS, 0.5, np.float32))
    actions = m.trained(1, outcome(eps=None, weight=40, secure=False))
    (update,) = sends(actions)
    assert update.type == sr.PLAIN_UPDATE and update.body == {"weight": 40}
    assert np.allclose(np.frombuffer(update.blobs[0], "<f4"), outcome(secure=False).update * 40)
    assert np.frombuffer(update.blobs[1], "<i8").sum() == 8
    actions = m.receive(Msg(sr.ROUND_END, 1, {"status": "completed", "fed_val_accuracy": 0.75}))
    assert events(actions) == [RoundFinished(1, "completed", 0.75, None)]
    assert m.phase is sr.Phase.READY and m.rounds_trained == 1


def test_a_secure_round_advertises_keys_and_refuses_bad_participants() -> None:
    m = joined()
    for participants in ({"1": "not a key"}, {"2": PEER.public_line(), "3": IdentityKey.generate().public_line()},
                         {"x": ME.public_line()}, {"1": ME.public_line()}, []):
        before = snapshot(m)
        with pytest.raises(sr.MessageRefused):
            m.receive(round_start(1, participants))  # type: ignore[arg-type]
        assert snapshot(m) == before
    m.receive(round_start(1))
    actions = m.trained(1, outcome(eps=1.5))
    assert events(actions) == [StageChanged(1, "keys")]
    (advert,) = sends(actions)
    assert advert.type == sr.SECAGG
    assert isinstance(secagg.decode(advert.blobs[0], max_vector_len=100), secagg.AdvertiseKeys)
    assert m.phase is sr.Phase.SECAGG and m.epsilon_spent == 1.5


def test_a_pinned_roster_refuses_a_round_naming_a_key_off_it() -> None:
    from hemafed.core.trust.roster import roster_from_fingerprints

    m = joined()
    m.roster = roster_from_fingerprints([ME.fingerprint, PEER.fingerprint])
    planted = {"1": ME.public_line(), "2": IdentityKey.generate().public_line()}  # the aggregator's own key
    before = snapshot(m)
    with pytest.raises(sr.MessageRefused, match="roster"):
        m.receive(round_start(1, planted))
    assert snapshot(m) == before
    assert any(isinstance(a, sr.Train) for a in m.receive(round_start(1)))  # the real peers: accepted


def test_budget_exhausted_declines_the_round_and_stops() -> None:
    m = joined()
    m.receive(round_start(1))
    actions = m.budget_exhausted(1, "privacy budget exhausted for federation 'fed'")
    assert sends(actions) == [sr.Send(sr.DECLINE, 1, {"reason": "budget_exhausted"})]
    declined, failed = events(actions)
    assert declined == RoundFinished(1, "declined", None, 0.5, "privacy budget exhausted for federation 'fed'")
    assert failed.fatal and "ledger" in failed.what_to_do
    assert actions[-1] == sr.Stop() and m.phase is sr.Phase.STOPPED
    with pytest.raises(sr.MessageRefused):
        m.receive(Msg(sr.ROUND_END, 1, {"status": "completed"}))


def test_stop_and_connection_loss_end_the_round_for_this_site() -> None:
    m = joined()
    m.receive(round_start(1))
    actions = m.train_cancelled(1, recorded=False, epsilon_spent=0.5)
    (left,) = events(actions)
    assert left.status == "left" and "nothing recorded" in left.detail
    assert events(m.stop()) == [] and m.phase is sr.Phase.STOPPED

    m = joined()
    m.receive(round_start(1))
    m.trained(1, outcome(eps=1.0))
    (left,) = events(m.connection_lost("peer\ngone"))
    assert left.round == 1 and left.status == "left" and "peer\\x0agone" in left.detail and left.epsilon_spent == 1.0
    assert m.phase is sr.Phase.WAIT_PLAN
    m.connected()
    with pytest.raises(sr.MessageRefused):
        m.receive(round_start(2))  # a new session starts with the plan again
    m.receive(plan_msg(make_plan()))
    prepared_and_featurized(m)
    # the restarted aggregator re-runs round 1: this site takes part again
    assert any(isinstance(a, sr.Train) for a in m.receive(round_start(1)))
    m.trained(1, outcome())
    assert "spend stays recorded" in events(m.stop())[0].detail


def test_done_saves_the_final_model_and_ends_the_run() -> None:
    m = joined()
    with pytest.raises(sr.MessageRefused):
        m.receive(Msg(sr.DONE, 1, {}, (weights(),)))  # the plan has 2 rounds
    classes = len(make_plan().classes)
    for mix in ([3] * (classes - 1), [-1] + [3] * (classes - 1), [0] * classes, [1.5] * classes, "eight"):
        with pytest.raises(sr.MessageRefused, match="class counts"):  # one count per class, or nothing
            m.receive(Msg(sr.DONE, 2, {"validation_classes": mix}, (weights(),)))
    (finish,) = m.receive(Msg(sr.DONE, 2, {"validation_classes": list(range(classes))}, (weights(0.25),)))
    assert isinstance(finish, sr.Finish) and finish.round == 2 and finish.weights[0] == np.float32(0.25)
    assert finish.class_mix == tuple(range(classes))
    assert m.phase is sr.Phase.DONE
    with pytest.raises(sr.MessageRefused):
        m.receive(plan_msg(make_plan()))


def test_out_of_order_and_malformed_messages_are_refused_with_the_state_unchanged() -> None:
    fresh = machine()
    for msg in (round_start(1), Msg(sr.ROUND_END, 1, {"status": "completed"}), Msg(sr.DONE, 2, {}, (weights(),)),
                Msg(sr.SECAGG, 1, {}, (b"x",)), Msg("error", 0), Msg(sr.PLAN, 0, "not a body")):  # type: ignore[arg-type]
        before = snapshot(fresh)
        with pytest.raises(sr.MessageRefused):
            fresh.receive(msg)
        assert snapshot(fresh) == before

    m = joined()
    m.receive(round_start(1))
    m.trained(1, outcome())
    bad = [
        plan_msg(make_plan()),  # a second plan in the same session
        round_start(1),  # the same round again
        round_start(3),  # past the plan's rounds
        round_start(2, blob=weights()[:-4]),  # wrong size
        round_start(2, blob=np.full(N_PARAMS, np.nan, "<f4").tobytes()),
        Msg(sr.SECAGG, 2, {}, (b"",)),  # another round
        Msg(sr.SECAGG, 1, {}, ()),
        Msg(sr.SECAGG, 1, {}, (b"\x00" * 40,)),  # undecodable
        Msg(sr.ROUND_END, 2, {"status": "completed"}),
        Msg(sr.ROUND_END, 1, {"status": "finished"}),
        Msg(sr.ROUND_END, 1, {"status": "completed", "fed_val_accuracy": 10**400}),
        Msg(sr.ROUND_END, 1, {"status": "completed", "fed_val_accuracy": float("nan")}),
        Msg(sr.ROUND_END, 1, {"status": "completed", "fed_val_accuracy": True}),
        Msg(sr.ROUND_END, 1, {"status": ["completed"]}),
        Msg(sr.ROUND_END, -1, {"status": "completed"}),
        Msg(sr.ROUND_END, True, {"status": "completed"}),  # type: ignore[arg-type]
        Msg(sr.DONE, 2, {}, ()),
        Msg("plan_accept", 0),
    ]
    for msg in bad:
        before = snapshot(m)
        with pytest.raises(sr.MessageRefused):
            m.receive(msg)
        assert snapshot(m) == before, msg


def test_random_messages_only_raise_message_refused() -> None:
    """10,000 generated messages of every type, in any order, against a machine in each phase:
    nothing but MessageRefused escapes, and a refused message changes nothing."""
    rng = random.Random(7)
    junk = [None, True, -1, 0, 1, 2, 3, 10**400, 1e308, float("inf"), float("nan"), "", "completed", "x" * 5000,
            [], [1], {}, {"1": "hemafed-ed25519 AAAA"}, {"1": ME.public_line()}, make_plan().to_dict()]
    keys = ["plan", "digest", "site_id", "participants", "status", "fed_val_accuracy", "reason"]
    blobs = [(), (b"",), (weights(),), (weights(), weights()), (b"\xff" * 48,), (secagg.encode(
        secagg.RoundAbandoned(round=1, reason="x")),)]
    types = [sr.PLAN, sr.ROUND_START, sr.SECAGG, sr.ROUND_END, sr.DONE, "hello", sr.DECLINE]

    def states() -> list[sr.SiteRound]:
        a, b, c = machine(), joined(), joined()
        b.receive(round_start(1))
        b.trained(1, outcome())
        c.receive(round_start(1))
        return [a, b, c]

    machines = states()
    refused = handled = 0
    for i in range(10_000):
        m = machines[i % 3]
        body = {k: rng.choice(junk) for k in rng.sample(keys, rng.randint(0, 3))}
        msg = Msg(rng.choice(types), rng.choice([0, 1, 2, 3, 10**400, -1]), body, rng.choice(blobs))
        before = snapshot(m)
        try:
            m.receive(msg)
            handled += 1
        except sr.MessageRefused:
            refused += 1
            assert snapshot(m) == before
        if not m.running or i % 50 == 0:
            machines = states()
    assert refused > 9000 and handled > 0


def test_safe_text_escapes_and_caps_peer_text() -> None:
    assert safe_text("round 3 ok\nFAKE LOG LINE\x1b[31m") == "round 3 ok\\x0aFAKE LOG LINE\\x1b[31m"
    assert safe_text("a\u202eb") == "a\\u202eb"  # no right-to-left override on a screen
    assert len(safe_text("y" * 10_000, 50)) == 50 and safe_text("y" * 10_000, 50).endswith("…")
    assert len(safe_text("\n" * 10_000, 50)) <= 50
    assert safe_text(10**5000) == "<int>" and safe_text(12) == "12"
    assert safe_list(["a\n", 3] * 30) == ["a\\x0a", "3"] * 10 and safe_list(5) == ["5"]


def test_a_plan_accepted_before_is_not_reviewed_again_and_a_changed_one_says_what_changed() -> None:
    plan = make_plan()
    m = sr.SiteRound(SiteBounds(), identity=ME.private_key, federation="fed", auto_accept=False,
                     plan_problems=model_problems, accepted={"fed": plan})
    m.receive(plan_msg(plan))
    actions = m.prepared(None, n_params=N_PARAMS)
    assert not events(actions)[0].awaiting_answer and isinstance(actions[-1], sr.Featurize)  # no click
    changed = make_plan(rounds=3, lr=0.2)
    m2 = sr.SiteRound(SiteBounds(), identity=ME.private_key, federation="fed", auto_accept=False,
                      plan_problems=model_problems, accepted={"fed": plan})
    m2.receive(plan_msg(changed))
    received = events(m2.prepared(None, n_params=N_PARAMS))[0]
    assert received.awaiting_answer and set(received.changes) == {("rounds", "2", "3"), ("lr", "0.1", "0.2")}


def test_a_round_without_this_site_is_said_and_a_finished_federation_stops_the_site() -> None:
    m = machine()
    m.receive(plan_msg(make_plan()))
    m.prepared(None, n_params=N_PARAMS)  # accepted; now preparing
    (without,) = events(m.receive(Msg(sr.STATUS, 1, {"rounds": 2, "participants": 3, "reason": "preparing"})))
    assert without == RoundWithoutThisSite(1, 2, 3, "preparing") and m.phase is sr.Phase.FEATURIZING
    with pytest.raises(sr.MessageRefused):
        m.receive(Msg(sr.STATUS, 9, {"rounds": 2, "participants": 3, "reason": "preparing"}))
    actions = m.receive(Msg(sr.FINISHED, 2, {"rounds": 2, "completed": 2}))
    (failed,) = events(actions)
    assert failed.fatal and "has finished" in failed.message and actions[-1] == sr.Stop()
