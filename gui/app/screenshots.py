"""Render every page of the app with real data to PNG (docs/screenshots/):

    QT_QPA_PLATFORM=offscreen .venv/bin/python -m hemafed.gui.app.screenshots [--out docs/screenshots]

Real inputs: the PBC sample JPEGs (../shared/data) on the Data page; then the site's
data is a 3,000-image draw from BloodMNIST's training split (an .npz), on which a
cnn4_28 model is trained here for a few DP-SGD rounds with σ from the site's own
calibration, each round recorded in a real privacy ledger and scored on the site's
validation split. The federation page is driven by the site driver's own event
dataclasses (replayed, no aggregator runs here); Classify runs the model on PBC JPEGs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

SIZES = ((1280, 800), (1920, 1080))
FEDERATION = "bloodmnist-demo"
SITE_IMAGES = 3000  # a mid-size hospital; keeps the demo training to a few minutes on 2 cores


def _not_cells(pbc: Path) -> list[str]:
    """Two images that are not a single blood cell, made from the PBC sample: a whole smear field (nine images
    side by side) and red cells at the microscope's scale (where four images meet)."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in sorted(pbc.glob("*/*.jpg"))[::20][:9]]
    w, h = images[0].size
    field = Image.new("RGB", (3 * w, 3 * h))
    for j, im in enumerate(images):
        field.paste(im.resize((w, h)), ((j % 3) * w, (j // 3) * h))
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="hemafed-not-cells-"))
    field.save(folder / "smear field.jpg")
    field.crop((w - 100, h - 100, w + 100, h + 100)).save(folder / "red cells only.jpg")
    return [str(folder / "smear field.jpg"), str(folder / "red cells only.jpg")]


def _uncertain(pbc: Path, model_path: Path | None, shown: list[str]) -> list[str]:
    """The first PBC JPEG (in name order, not among `shown`) that the model answers "uncertain", so the screenshot
    shows that state too; none without a calibrated model file."""
    from hemafed.core.learning.classify import classify_paths, load_model_file

    if model_path is None:
        return []
    model = load_model_file(model_path)
    if model.calibration is None:
        return []
    candidates = [p for p in sorted(pbc.glob("*/*.jpg")) if str(p) not in shown]
    for prediction in classify_paths(model, candidates).predictions:
        if prediction.uncertain and not prediction.out_of_distribution:
            return [prediction.path]
    return []


def _wait(app, until, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not until():
        if time.monotonic() > end:
            raise TimeoutError("the app did not settle")
        app.processEvents()
        time.sleep(0.01)


def _settle(app, window, seconds: float = 0.4) -> None:
    """Let workers (charts, thumbnails, projections) finish and the window repaint."""
    from hemafed.gui.app.charts import Chart

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)
    _wait(app, lambda: not window.state.projection_pending
          and not any(c.busy() for c in window.findChildren(Chart))
          and not window.data_page.model.busy())
    app.processEvents()


def train_demo_model(source: Path, state_dir: Path, out: Path, rounds: int = 3):
    """A real (small) result: cnn4_28 trained by this site's own trainer (`core.learning.site_trainer`: DP-SGD with
    σ fitted to ε = 8, each round recorded in this site's ledger before its update exists outside it), the rounds
    applied as the aggregator would with this site alone. Returns (plan, accuracies, model path)."""
    import numpy as np

    from hemafed.core.data.partition import stratified_split
    from hemafed.core.data.scan import scan_source
    from hemafed.core.learning.dp_train import accuracy, evaluate
    from hemafed.core.learning.models import build_model, get_flat_params, set_flat_params
    from hemafed.core.learning.site_trainer import SiteData, site_trainer
    from hemafed.core.privacy.ledger import PrivacyLedger
    from hemafed.core.rounds.plan import FederationPlan
    from hemafed.core.secagg.quantize import dequantize
    from hemafed.network.site import save_model_file

    plan = FederationPlan(federation_id=FEDERATION, model="cnn4_28", algorithm="fedavg", dp_mode="local",
                          noise_multiplier=0.0, rounds=10, local_epochs=2, batch_size=128, threshold=3, min_sites=3,
                          lr=0.1, momentum=0.9)
    site = scan_source(source, plan.classes, size=plan.input_size)
    train, val = stratified_split(site.labels, plan.val_fraction, seed=plan.seed)
    data = SiteData(site.images[train], site.labels[train], site.images[val], site.labels[val])
    ledger = PrivacyLedger(plan.federation_id, 8.0, min(plan.delta, 1.0 / len(train)), state=state_dir)
    trainer = site_trainer(plan)
    trainer.prepare(ledger, data, 8.0)
    model = build_model(plan.model, len(plan.classes), seed=0)
    weights = get_flat_params(model)
    cfg = plan.secagg_config(len(weights))
    accuracies = []
    for rnd in range(1, rounds + 1):
        weighted, weight, _ = dequantize(cfg, trainer.contribution(rnd, weights).ring)
        weights = (weights + weighted / weight).astype(np.float32)
        set_flat_params(model, weights)
        accuracies.append(accuracy(evaluate(model, site.images[val], site.labels[val], len(plan.classes))))
    assert np.isfinite(weights).all()
    return plan, accuracies, save_model_file(out, weights, plan, rounds)


def fedsgd_plan():
    """A DP-FedSGD plan with distributed DP as a federation's admin sets it up for 9 hospitals
    (`hemafed privacy fedsgd-plan`): σ shared by every site, q per image, one step per round."""
    from hemafed.core.learning.recipe import RECIPE, with_budget
    from hemafed.core.rounds.plan import FederationPlan, default_threshold

    q, rounds, t = 0.02, 200, default_threshold(9)
    plan = FederationPlan(federation_id="blood-cells-2026", model=RECIPE["model"], rounds=rounds,
                          algorithm="fedsgd", sample_rate=q, batch_size=round(q * 9 * 1800), threshold=t,
                          min_sites=t, max_sites=9)
    return with_budget(plan, 6.0, recipe_lr=True)


def site_npz(source: Path, out: Path, n: int = SITE_IMAGES) -> Path:
    """This demo hospital's images: `n` images drawn from BloodMNIST's training split."""
    import numpy as np

    with np.load(source) as data:
        images, labels = data["train_images"], data["train_labels"]
    pick = np.sort(np.random.default_rng(0).choice(len(labels), n, replace=False))
    np.savez(out, train_images=images[pick], train_labels=labels[pick])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/screenshots")
    parser.add_argument("--classify-model", type=Path,
                        help="model file for the Classify screens, e.g. the main job's results/simulation/"
                             "final_model.npz (default: the small demo model trained here)")
    parser.add_argument("--evidence", type=Path, metavar="SITE_STATE_DIR",
                        help="only the privacy-evidence screens (What left this computer, the Privacy page's report "
                             "export), from the state of a site that took part in a real federation, e.g. "
                             "results/simulation/sites/hospital_01/state after `hemafed simulate`")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from PySide6.QtWidgets import QApplication

    if args.evidence is not None:
        app = QApplication.instance() or QApplication([])
        with tempfile.TemporaryDirectory() as tmp:
            for width, height in SIZES:
                shoot_evidence(app, Path(tmp) / f"cfg{width}", args.evidence, out, width, height)
        from hemafed.gui.app.workers import wait_for_jobs

        wait_for_jobs()
        return 0

    from hemafed.core.paths import dev_data_dir

    data = dev_data_dir()
    if data is None or not (data / "pbc_sample").is_dir():
        raise SystemExit("needs ../shared/data/pbc_sample (or HEMAFED_DATA_DIR)")
    pbc = data / "pbc_sample"
    app = QApplication.instance() or QApplication([])
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp) / "state"
        state_dir.mkdir()
        os.environ["HEMAFED_STATE_DIR"] = str(state_dir)
        npz = site_npz(data / "bloodmnist" / "bloodmnist_28.npz", Path(tmp) / "site-bloodmnist.npz")
        print("training the demo model (a few DP-SGD rounds on the site's images)…", flush=True)
        started = time.monotonic()
        plan, accuracies, model_path = train_demo_model(npz, state_dir, Path(tmp) / "final.npz")
        print(f"trained in {time.monotonic() - started:.0f} s; accuracy per round {accuracies}", flush=True)
        for width, height in SIZES:
            shoot(app, Path(tmp) / f"cfg{width}", pbc, npz, plan, accuracies, model_path, out, width, height,
                  classify_model=args.classify_model)
    from hemafed.gui.app.workers import wait_for_jobs

    wait_for_jobs()
    return 0


def shoot(app, config_dir: Path, pbc: Path, npz: Path, plan, accuracies, model_path: Path, out: Path,
          width: int, height: int, classify_model: Path | None = None) -> None:
    from hemafed.core.trust.identity import init_identity
    from hemafed.gui.app.main import create_window
    from hemafed.gui.app.state import RoundRecord
    from hemafed.network import site_events as ev

    window = create_window(config_dir)
    state = window.state
    window.resize(width, height)
    window.show()
    suffix = f"{width}x{height}"

    def grab(name: str, widget=None) -> None:
        _settle(app, window)
        path = out / f"{name}-{suffix}.png"
        (widget or window).grab().save(str(path))
        print("wrote", path, flush=True)

    # Data: the PBC sample, a platelet previewed
    window.show_page("data")
    page = window.data_page
    page.start_scan(str(pbc))
    _wait(app, lambda: page.job is None and state.scan is not None)
    page.filter.setCurrentIndex(1)
    _settle(app, window)
    page.show_preview(page.model.index(3))
    _wait(app, lambda: "pixels" in page.preview_info.text())
    page.filter.setCurrentIndex(0)
    grab("data")
    page.start_scan(str(npz))  # from here on, the site's data is the one the demo model trained on
    _wait(app, lambda: page.job is None and state.scan is not None and state.scan.report.kind == "npz")

    # Privacy: the received plan, with the rounds already in this site's ledger
    state.set_plan(plan, received=True)
    state.refresh_ledgers()
    window.show_page("privacy")
    grab("privacy")

    # Federation, mid-round, in a DP-FedSGD federation with distributed DP (the default recipe):
    # the driver's events, replayed in the order it sends them
    init_identity(state.state_dir) if not (state.state_dir / "identity").exists() else None
    fed = window.federation_page
    fed.refresh_identity()
    fed.url.setText("wss://aggregator.hospital-network.example:8765")
    fed.ca.setText(str(Path.home() / "hemafed" / "federation-ca.pem"))
    sgd = fedsgd_plan()
    fed.federation.setText(sgd.federation_id)
    window.show_page("federation")
    from hemafed.gui.app.projection import project

    proj = project(state.epsilon, sgd, state.n_train(), bounds=state.bounds)
    assert proj.fits and proj.epsilon_per_round, proj.refusal
    received = ev.PlanReceived(sgd, proj.settings, (), tuple(proj.epsilon_per_round), awaiting_answer=True)
    from hemafed.gui.app.site_status import joining

    fed._set_status(joining())  # what pressing Join does before the driver's first event
    fed.on_event(ev.ConnectionChanged("connecting", fed.url.text()))
    fed.on_event(ev.ConnectionChanged("connected", fed.url.text()))
    fed.on_event(ev.PlanAnswered(True))
    # preparing: the first join with these images computes their fixed features (the aggregator waits)
    fed.on_event(ev.StageChanged(0, "preparing"))
    n_images = state.n_train() or SITE_IMAGES
    fed.on_event(ev.PrepareProgress(0, n_images, None))
    fed.on_event(ev.PrepareProgress(n_images * 2 // 5, n_images, 95.0))
    fed.join_btn.setEnabled(False)
    fed.leave_btn.setEnabled(True)
    fed.joinedChanged.emit(True)
    grab("federation-preparing")
    fed.on_event(ev.PrepareProgress(n_images, n_images, 0.0))
    fed.on_event(ev.StageChanged(0, "waiting"))
    done = 57
    for rnd in range(done - 3, done + 1):
        fed.on_event(ev.RoundStarted(rnd, sgd.rounds, 9))
        fed.on_event(ev.StageChanged(rnd, "training"))
        fed.on_event(ev.TrainProgress(rnd, 1, 1, 1.9 - rnd / 100))
        for stage in ("keys", "shares", "masked", "unmask"):
            fed.on_event(ev.StageChanged(rnd, stage))
        fed.on_event(ev.RoundFinished(rnd, "completed", accuracy=0.55 + rnd / 400,
                                      epsilon_spent=proj.epsilon_per_round[rnd - 1]))
    nxt = done + 1
    fed.on_event(ev.RoundStarted(nxt, sgd.rounds, 9))
    fed.on_event(ev.StageChanged(nxt, "training"))
    fed.on_event(ev.TrainProgress(nxt, 1, 1, 1.43))
    fed.on_event(ev.StageChanged(nxt, "masked"))
    fed.join_btn.setEnabled(False)
    fed.leave_btn.setEnabled(True)
    fed.joinedChanged.emit(True)
    grab("federation")

    # Plan review (the dialog the operator sees before round 1)
    fed.review_plan(received)
    dialog = fed.dialog
    _settle(app, window)
    grab("plan-review", dialog)
    dialog.finished.disconnect()  # only a picture: no answer is logged
    dialog.close()
    fed.dialog = None
    from hemafed.core.privacy.ledger import PrivacyLedger

    entries = PrivacyLedger(plan.federation_id, state=state.state_dir).entries

    # Results: accuracy per round, confusion on this site's validation split, statement
    # (the demo federation this site trained in, not the DP-FedSGD one replayed above)
    state.rounds = []
    for rnd, acc in enumerate(accuracies, start=1):
        state.add_round(RoundRecord(rnd, "completed", acc, entries[rnd - 1].epsilon))
    state.set_model(model_path)
    window.show_page("results")
    window.results_page.tabs.setCurrentIndex(0)
    _wait(app, lambda: window.results_page.job is None)
    grab("results")

    # Classify: full-size PBC JPEGs, one per class (and one the model is uncertain about)
    if classify_model is not None:
        state.set_model(classify_model)
    window.results_page.tabs.setCurrentIndex(1)
    panel = window.results_page.classify_panel
    files = [str(sorted((pbc / c).glob("*.jpg"))[5]) for c in plan.classes] + _not_cells(pbc)
    files += _uncertain(pbc, state.model_path, files)
    panel.classify(files)
    _wait(app, lambda: panel.job is None)
    grab("classify")

    # One failure state: this site's key is not on the federation's list
    window.show_page("federation")
    from hemafed.core.trust.identity import load_identity, short_fingerprint

    fp = short_fingerprint(load_identity(state.state_dir).public_key)
    # a fresh Join from a PC whose key the federation does not list (yet)
    fed.log.clear()
    for label in (fed.round_label, fed.participants, fed.epsilon):
        label.setText("—")
    fed._set_status(joining())
    fed.on_event(ev.ConnectionChanged("connecting", fed.url.text()))
    fed.on_event(ev.SiteFailed("The aggregator does not know this site's key: it is not on the federation's list.",
                               fatal=True, what_to_do=f"send the public key (fingerprint {fp}) to the federation's "
                               "admin, confirm the fingerprint by phone, then press Join again. The site has "
                               "stopped retrying."))
    fed.on_event(ev.ConnectionChanged("disconnected", fed.url.text(), "refused by the aggregator"))
    fed.join_btn.setEnabled(True)
    fed.leave_btn.setEnabled(False)
    fed.joinedChanged.emit(False)
    grab("error-unknown-key")
    if (width, height) == SIZES[0]:  # every other failure the driver reports, with the app's next step
        for code, failure in failure_states(fed.url.text(), sgd, state.bounds).items():
            show_failure(fed, failure)
            grab(f"error-{code}", fed)
    window.close()


def failure_states(url: str, plan, bounds) -> dict:
    """One SiteFailed per failure code, worded as the driver words it (the real functions make the text where
    they are cheap to call: the connection problem, the plan bounds check, the finished message)."""
    from dataclasses import replace

    from hemafed.core.privacy.ledger import BudgetExhausted
    from hemafed.network import site_events as ev
    from hemafed.network.client import connect_problem

    refused = connect_problem(ConnectionRefusedError(111, "Connect call failed"), url)
    strict = replace(bounds, require_local_dp=True, max_rounds=300)
    return {
        "unreachable": ev.SiteFailed(f"cannot reach the aggregator at {url}: {refused}", False, code="unreachable"),
        "bad-address": ev.SiteFailed("aggregator.hospital-network.example:8765: the aggregator URL must start with "
                                     "wss://", True, code="bad_address"),
        "certificate": ev.SiteFailed(f"{url}: server certificate not trusted: self-signed certificate in "
                                     "certificate chain", True, code="certificate"),
        "wrong-aggregator": ev.SiteFailed(f"{url} is not this federation's aggregator: it runs federation "
                                          "'ward-7-pilot'", True, code="wrong_aggregator"),
        "plan-refused": ev.SiteFailed("The federation's plan is outside what this site accepts: "
                                      + "; ".join(strict.violations(plan)) + ".", True, code="plan_refused"),
        "budget": ev.SiteFailed(str(BudgetExhausted(plan.federation_id, 2.996, 3.052, 3.0, plan.delta)), True,
                                code="budget"),
        "data": ev.SiteFailed("cannot prepare this site's images: /data/blood-cells is missing (is the drive "
                              "connected?)", True, code="data"),
        "finished": ev.SiteFailed(f"The federation has finished: {plan.rounds} of its {plan.rounds} rounds "
                                  "completed, without this site.", True, code="finished"),
    }


def show_failure(fed, failure) -> None:
    """The Federation page after a fresh Join that met `failure` (a retried problem keeps the site joined)."""
    from hemafed.gui.app.site_status import joining
    from hemafed.network import site_events as ev

    fed._log_lines.clear()
    fed.log.clear()
    fed._set_status(joining())
    fed.append_log(f"joining {fed.url.text()} with budget ε = {fed.state.epsilon:g}")
    fed.on_event(ev.ConnectionChanged("connecting", fed.url.text()))
    fed.on_event(failure)
    if failure.fatal:
        fed.on_event(ev.Finished(None, outcome="failed"))
    fed.join_btn.setEnabled(failure.fatal)
    fed.leave_btn.setEnabled(not failure.fatal)
    fed.joinedChanged.emit(not failure.fatal)


def shoot_evidence(app, config_dir: Path, site_state: Path, out: Path, width: int, height: int) -> None:
    """The What left this computer page and the Privacy page after *Export privacy report…*, for a site that took
    part in a real federation (its store and identity key are read, never written; the report goes to a
    temporary folder)."""
    from hemafed.gui.app.main import create_window
    from hemafed.gui.app.report_export import write_report

    window = create_window(config_dir, state_dir=site_state)
    window.resize(width, height)
    window.show()
    suffix = f"{width}x{height}"
    window.show_page(window.outbound_page.title)
    window.outbound_page.reload()
    _settle(app, window)
    window.outbound_page.messages.scrollToBottom()
    _settle(app, window)
    window.grab().save(str(out / f"outbound-{suffix}.png"))
    print("wrote", out / f"outbound-{suffix}.png", flush=True)
    window.show_page("privacy")
    window.state.refresh_ledgers()
    _settle(app, window)
    page = window.privacy_page
    with tempfile.TemporaryDirectory() as tmp:
        page.show_export(True, write_report(window.state, Path(tmp) / "privacy-report.pdf",
                                            page.selected_federation()))
    _settle(app, window)
    window.grab().save(str(out / f"privacy-export-{suffix}.png"))
    print("wrote", out / f"privacy-export-{suffix}.png", flush=True)
    window.close()


if __name__ == "__main__":
    raise SystemExit(main())
