"""The app's model: everything the pages share, with signals the pages subscribe to.
No widgets here; pages only read it and call its setters (napari style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PySide6.QtCore import QObject, QTimer, Signal

from hemafed.core.data.scan import ScanReport
from hemafed.core.rounds.plan import FederationPlan, SiteBounds

from .projection import project
from .settings import Settings
from .workers import Job

if TYPE_CHECKING:
    from hemafed.core.learning.site_trainer import Projection

DEFAULT_EPSILON = 8.0
DEFAULT_MAX_DELTA = 1e-4
DEFAULT_URL = "wss://aggregator.example.org:8765"


def default_plan() -> FederationPlan:
    """The plan shown before an aggregator has sent one: the federation defaults."""
    return FederationPlan(federation_id="not-joined-yet")


@dataclass
class ScanResult:
    """A finished scan of the site's images, as the Data page shows it."""

    report: ScanReport
    labels: np.ndarray  # label index per usable image
    files: list[Path] = field(default_factory=list)  # usable files (folder / CSV); empty for .npz
    images: np.ndarray | None = None  # the pixels of an .npz source (N, H, W, 3)
    # usable images the federation's last model file does not recognise as a single blood cell: (name, score)
    unlike: list[tuple[str, float]] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return self.report.classes


@dataclass
class RoundRecord:
    round: int
    status: str
    accuracy: float | None
    epsilon_spent: float | None


def round_history(state_dir: Path, federation_id: str | None = None) -> tuple[str | None, list[RoundRecord]]:
    """(federation, its rounds as this site saw them) from the site's round log: the named federation, or the
    one this site took part in last. A round seen twice (a rejoin) keeps its last outcome."""
    from hemafed.core.privacy.store import SiteStore

    log = SiteStore(state_dir).round_log(federation_id)
    if federation_id is None and log:
        federation_id = log[-1]["federation_id"]
        log = [line for line in log if line["federation_id"] == federation_id]
    rounds: dict[int, RoundRecord] = {}
    for line in log:
        if line["status"] in ("trained", "preparing"):
            continue
        rounds[line["round"]] = RoundRecord(line["round"], line.get("outcome") or line["status"],
                                            line.get("accuracy"), line.get("epsilon_spent"))
    return federation_id, [rounds[r] for r in sorted(rounds)]


class AppState(QObject):
    scanChanged = Signal()
    budgetChanged = Signal()
    planChanged = Signal()
    projectionChanged = Signal()
    ledgersChanged = Signal()
    roundsChanged = Signal()
    modelChanged = Signal()

    def __init__(self, settings: Settings, state_dir: Path | None = None) -> None:
        super().__init__()
        from hemafed.core.paths import state_dir as default_state_dir

        self.settings = settings
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.scan: ScanResult | None = None
        self.source = settings.get_str("data/source")
        self.epsilon = settings.get_float("privacy/epsilon", DEFAULT_EPSILON)
        self.max_delta = settings.get_float("privacy/max_delta", DEFAULT_MAX_DELTA)
        self.operator = settings.get_str("site/operator", "")  # named in the record of each plan accepted here
        self.plan = default_plan()
        self.plan_received = False
        self.projection: Projection | None = None
        self.ledgers: list[dict] = []
        self.rounds: list[RoundRecord] = []
        self.rounds_federation: str | None = None  # the federation `rounds` belong to
        self.model_path: Path | None = None
        self.privacy_used: dict | None = None  # σ, q, steps, δ of the plan this site joined
        self._projection_job: Job | None = None
        self._ledger_jobs: list[Job] = []
        self._projection_dirty = False
        self._closed = False
        # Calibration takes 0.3-3 s (the first call imports the accountant's maths), so it runs
        # in a worker; a burst of slider moves is coalesced into one computation.
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(120)
        self._debounce.timeout.connect(self._start_projection)
        # the ledgers are read in a worker: a long ledger never holds the window back at start
        self.ledgers_loading = True
        self.refresh_ledgers_soon()
        self.load_rounds()  # the accuracy history of the last federation survives a restart
        self.update_projection()

    # -- data ---------------------------------------------------------------------------------

    def set_scan(self, scan: ScanResult | None) -> None:
        self.scan = scan
        if scan is not None:
            self.source = scan.report.source
            self.settings.set("data/source", self.source)
        self.scanChanged.emit()
        self.update_projection()

    def split(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(train, val) indices the site will use for the current plan (the driver's split)."""
        from hemafed.core.data.partition import stratified_split

        if self.scan is None or len(self.scan.labels) == 0:
            return None
        return stratified_split(self.scan.labels, self.plan.val_fraction, seed=self.plan.seed)

    def n_train(self) -> int | None:
        split = self.split()
        return None if split is None else len(split[0])

    # -- privacy ------------------------------------------------------------------------------

    @property
    def bounds(self) -> SiteBounds:
        """What this site accepts of a plan (the Privacy page sets it; `<state>/bounds.toml` keeps it)."""
        from dataclasses import replace

        from hemafed.network.config import read_bounds_file

        return replace(read_bounds_file(self.state_dir) or SiteBounds(), max_delta=self.max_delta)

    def bounds_path(self) -> Path:
        from hemafed.network.config import BOUNDS_FILE

        return self.state_dir / BOUNDS_FILE

    def set_bounds(self, **changes) -> None:
        """Change what this site accepts (and write it where the headless site reads it too)."""
        from dataclasses import replace

        from hemafed.network.config import write_bounds_file

        bounds = replace(self.bounds, **changes)
        write_bounds_file(self.state_dir, bounds)
        self.update_projection()

    def change_federation_budget(self, federation_id: str, epsilon: float, reason: str = "") -> bool:
        """Set a federation's budget in its ledger (never below what is spent); False with the reason logged
        when the ledger refuses."""
        from hemafed.core.privacy.ledger import LedgerError, PrivacyLedger

        try:
            PrivacyLedger(federation_id, state=self.state_dir).change_budget(epsilon, reason)
        except (LedgerError, FileNotFoundError) as exc:
            self.last_error = str(exc)
            return False
        self.refresh_ledgers()
        self.update_projection()
        return True

    last_error = ""

    def rounds_not_completed(self, federation_id: str) -> dict[tuple[int, int], str]:
        """(round, run) → why, for ledger rounds whose update did not make it into a completed round (this site
        left, or the round was abandoned), from the site's round log."""
        from hemafed.core.privacy.store import SiteStore

        try:
            log = SiteStore(self.state_dir).round_log(federation_id)
        except Exception:  # a damaged store is reported by the ledger view itself
            return {}
        runs: dict[int, int] = {}
        out: dict[tuple[int, int], str] = {}
        for line in log:
            rnd, status = line["round"], line["status"]
            if status == "trained":
                runs[rnd] = runs.get(rnd, 0) + 1
            elif status in ("left", "round_end") and line.get("outcome") in ("left", "abandoned") and rnd in runs:
                out[(rnd, runs[rnd])] = "this site left the round" if line.get("outcome") == "left" else \
                    "the round was abandoned: too few sites remained"
        return out

    def set_budget(self, epsilon: float, max_delta: float | None = None) -> None:
        changed = epsilon != self.epsilon or (max_delta is not None and max_delta != self.max_delta)
        self.epsilon = float(epsilon)
        if max_delta is not None:
            self.max_delta = float(max_delta)
        self.settings.set("privacy/epsilon", self.epsilon)
        self.settings.set("privacy/max_delta", self.max_delta)
        if changed:
            self.budgetChanged.emit()
            self.update_projection()

    def set_operator(self, name: str) -> None:
        self.operator = " ".join(str(name).split())[:120]
        self.settings.set("site/operator", self.operator)

    def set_plan(self, plan: FederationPlan, received: bool = True) -> None:
        self.plan, self.plan_received = plan, received
        self.planChanged.emit()
        self.update_projection()

    def ledger_for(self, federation_id: str) -> dict | None:
        return next((e for e in self.ledgers if e.get("federation_id") == federation_id), None)

    def ledger_entries(self, federation_id: str) -> list:
        from hemafed.core.privacy.ledger import LedgerError, PrivacyLedger

        try:
            return list(PrivacyLedger(federation_id, state=self.state_dir).entries)
        except (FileNotFoundError, LedgerError, OSError):
            return []

    def refresh_ledgers(self) -> None:
        from hemafed.core.privacy.ledger import list_ledgers

        self.ledgers, self.ledgers_loading = list_ledgers(self.state_dir), False
        self.ledgersChanged.emit()

    def refresh_ledgers_soon(self) -> None:
        """`refresh_ledgers` read in a worker, for use while training: each summary replays the
        accountant over every round (50 ms and more), which would stall the window."""
        from hemafed.core.privacy.ledger import list_ledgers

        state_dir = self.state_dir
        job = Job(lambda job: list_ledgers(state_dir))
        job.signals.result.connect(self._ledgers_read)
        job.signals.finished.connect(lambda: self._ledger_jobs.remove(job) if job in self._ledger_jobs else None)
        self._ledger_jobs.append(job)
        job.start()

    def _ledgers_read(self, ledgers: list) -> None:
        self.ledgers, self.ledgers_loading = ledgers, False
        self.ledgersChanged.emit()
        self.update_projection()  # what is spent changed: so did what the rest of the plan would spend

    def update_projection(self) -> None:
        """Recompute σ and the ε projection soon (in a worker); `projectionChanged` follows."""
        if self._closed:  # a worker's answer after the window closed: nothing to show it in
            return
        self.projection_pending = True
        self._debounce.start()

    projection_pending = False

    def _start_projection(self) -> None:
        if self._projection_job is not None:
            self._projection_dirty = True
            return
        epsilon, plan, n_train, bounds = self.epsilon, self.plan, self.n_train(), self.bounds
        ledger = self.ledger_for(plan.federation_id)
        state_dir = self.state_dir

        def compute(job: Job) -> Projection:
            from dataclasses import replace

            from hemafed.core.privacy.ledger import LedgerError, PrivacyLedger

            if ledger is not None and "error" in ledger:
                return replace(project(epsilon, plan, n_train, bounds=bounds), refusal=(
                    f"this federation's privacy ledger is damaged ({ledger['error']}); restore it from a backup "
                    "before joining"))
            view = None
            if ledger is not None:
                try:
                    view = PrivacyLedger(plan.federation_id, state=state_dir).view()
                except (FileNotFoundError, LedgerError, OSError):
                    view = None
            return project(epsilon, plan, n_train, bounds=bounds, ledger=view)

        self._projection_job = Job(compute)
        self._projection_job.signals.result.connect(self._projection_ready)
        self._projection_job.signals.errored.connect(self._projection_failed)
        self._projection_job.signals.finished.connect(self._projection_done)
        self._projection_job.start()

    def _projection_ready(self, projection: Projection) -> None:
        if not self._projection_dirty:
            self.projection = projection
            self.projection_pending = False
            self.projectionChanged.emit()

    def _projection_failed(self, message: str) -> None:
        self.projection = None
        self.projection_pending = False
        self.projectionChanged.emit()

    def _projection_done(self) -> None:
        self._projection_job = None
        if self._projection_dirty:
            self._projection_dirty = False
            self._start_projection()

    def shutdown(self) -> None:
        self._closed = True
        self._debounce.stop()
        if self._projection_job is not None:
            self._projection_job.cancel()
        for job in self._ledger_jobs:
            job.cancel()

    def join_refusal(self) -> str | None:
        """Why this site cannot join now, in words (None: it can)."""
        if not self.source:
            return "no images chosen: choose a folder, CSV or .npz on the Data page"
        if not Path(self.source).exists():
            return f"the data folder {self.source} is missing: reconnect the drive or choose it again on the Data page"
        if self.scan is not None and self.scan.report.total_valid == 0:
            return f"no usable images in {self.source}: see the problems list on the Data page"
        if not self.plan_received:  # the federation's own plan comes after connecting: the site checks that one
            return None
        if self.projection_pending or self.projection is None:
            return "the privacy projection is still being computed; try again in a moment"
        if self.projection.refusal:
            return self.projection.refusal
        return None

    # -- federation results ---------------------------------------------------------------------

    def add_round(self, record: RoundRecord) -> None:
        self.rounds = [r for r in self.rounds if r.round != record.round] + [record]
        self.rounds.sort(key=lambda r: r.round)
        self.roundsChanged.emit()

    _rounds_generation = 0  # a read of the round log answers only if nothing was cleared or asked since

    def clear_rounds(self, federation_id: str | None) -> None:
        """A new federation: nothing of an earlier one is shown."""
        self._rounds_generation += 1
        self.rounds, self.rounds_federation = [], federation_id
        self.roundsChanged.emit()

    def load_rounds(self, federation_id: str | None = None) -> None:
        """Show the rounds this site's log holds for `federation_id` (None: the last federation it took part in),
        read in a worker; rounds reported live meanwhile are kept."""
        state_dir = self.state_dir
        self._rounds_generation += 1
        generation = self._rounds_generation

        def read(job: Job) -> tuple[str | None, list[RoundRecord]]:
            try:
                return round_history(state_dir, federation_id)
            except Exception:  # a damaged store is reported by the ledger view; the chart just stays empty
                return federation_id, []

        def loaded(result: tuple[str | None, list[RoundRecord]]) -> None:
            federation, history = result
            if self._closed or generation != self._rounds_generation:
                return  # another federation was joined meanwhile
            live = {r.round: r for r in self.rounds} if self.rounds_federation in (None, federation) else {}
            self.rounds = sorted({**{r.round: r for r in history}, **live}.values(), key=lambda r: r.round)
            self.rounds_federation = federation
            self.roundsChanged.emit()

        job = Job(read)
        job.signals.result.connect(loaded)
        job.signals.finished.connect(lambda: self._ledger_jobs.remove(job) if job in self._ledger_jobs else None)
        self._ledger_jobs.append(job)
        job.start()

    def set_model(self, path: Path | None) -> None:
        self.model_path = path
        if path is not None:
            self.settings.set("results/model", str(path))
        self.modelChanged.emit()
