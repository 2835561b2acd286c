"""`hemafed experiment` on a small slice of BloodMNIST: every section of the results document, every run
through the product's own code path (the in-process federation, the site trainer), the plot."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from hemafed.network.sim.experiment import ExperimentOptions, run_experiment
from hemafed.network.sim.simulate import SimulationOptions

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def test_experiment_writes_every_section_and_the_plot(shared_data: Path, tmp_path: Path) -> None:
    opts = ExperimentOptions(data=shared_data, seeds=(0, 1), epsilons=(8.0,), sweep=(4.0, 8.0),
                             partitions=("dirichlet:0.5", "iid"), sites=3, np_rounds=20, main_job=False,
                             workers=2, subset=300, test_subset=80, base=replace(SimulationOptions(), rounds=8))
    doc = tmp_path / "docs" / "RESULTS.md"
    rows = run_experiment(opts, tmp_path / "out", doc, "hemafed experiment --test")
    settings = [(r.section, r.partition, r.epsilon) for r in rows]
    # central np + ε8; alone np + ε8; per partition: np + (local, distributed) × ε8; sweep: ε4 × 2 modes
    assert len(rows) == 2 + 2 + 2 * 3 + 2
    assert ("sweep", "dirichlet:0.5", 4.0) in settings
    assert all(len(r.accuracies) == 2 and all(0 <= a <= 1 for a in r.accuracies) for r in rows)
    local = next(r for r in rows if r.section == "federated" and "local" in r.setting)
    distributed = next(r for r in rows if r.section == "federated" and "distributed" in r.setting)
    alone = next(r for r in rows if r.section == "alone" and r.epsilon == 8.0)
    assert local.sigma == pytest.approx(alone.sigma)  # both Gaussian at the same (ε, q, T)
    assert distributed.sigma >= local.sigma  # Skellam in the ring: its own calibration, never below Gaussian
    text = doc.read_text()
    assert "Incomplete" not in text and "Every federated row runs the product" in text
    for title in ("Baselines", "The federation", "Accuracy against ε"):
        assert f"## {title}" in text
    assert (doc.parent / "results-epsilon.png").stat().st_size > 10_000


def test_results_summarise_the_other_recipes_docs(tmp_path: Path) -> None:
    """RESULTS.md carries each other recipe's summary (from the doc its own experiment wrote) with a link, so the
    64-px option's figures stand beside the main recipe's; nothing when that doc is missing."""
    from hemafed.network.sim.experiment import other_recipes

    assert other_recipes(tmp_path) == []
    (tmp_path / "results-64px.md").write_text(
        "# Results\n\nCommand: ...\n\n## Summary\n\n- at ε = 8: **95.0%** ± 0.1% (distributed DP, dirichlet:0.5).\n"
        "- Centralised, non-private, same model: 96.7%.\n\n## Baselines\n\n| a | b |\n\n## Accuracy against ε\n\n"
        "| ε | distributed DP + secure aggregation | local DP + secure aggregation |\n|---|---:|---:|\n"
        "| 8 | 0.950 ± 0.001 | – |\n\nThe main recipe: [RESULTS.md](RESULTS.md).\n\n| unrelated | table |\n\n"
        "## At 28 pixels (another recipe)\n\n- at ε = 8: **94.0%** (not this recipe's).\n")
    section = other_recipes(tmp_path)
    assert section[0] == "## At 64 pixels (`hemafed simulate --model scatter_synth_inv_cc_ms_64`)"
    assert "[results-64px.md](results-64px.md)" in section[2] and "not been timed cold" in section[2]
    (tmp_path / "main-job-fresh.md").write_text("| 2026-12-03, `--model scatter_synth_inv_cc_ms_64` | 18 min |\n")
    assert "[main-job-fresh.md](main-job-fresh.md)" in other_recipes(tmp_path)[2]
    assert [line for line in section if line.startswith("- ")] == [
        "- at ε = 8: **95.0%** ± 0.1% (distributed DP, dirichlet:0.5).",
        "- Centralised, non-private, same model: 96.7%."]
    assert [line for line in section if line.startswith("|")] == [
        "| ε | distributed DP + secure aggregation | local DP + secure aggregation |", "|---|---:|---:|",
        "| 8 | 0.950 ± 0.001 | – |"]
    assert not any("look different" in line for line in section)
    (tmp_path / "appearance-64px.md").write_text("# Hospitals\n\n| table |\n\nLoss on the untouched test split "
                                                 "from the hospitals' different looks: +5.99 points.\n")
    shift = [line for line in other_recipes(tmp_path) if "look different" in line]
    assert shift == ["Hospitals whose images look different ([appearance-64px.md](appearance-64px.md)): Loss on the "
                     "untouched test split from the hospitals' different looks: +5.99 points."]


def test_results_rows_of_an_earlier_default_name_the_default_and_its_doc(tmp_path: Path) -> None:
    """When the default model changes before RESULTS.md's full experiment is rerun, its rows say whose they are and
    the default's own summary comes first (and not again among the other recipes)."""
    from hemafed.network.sim.experiment import OTHER_RECIPES, default_elsewhere, other_recipes

    default = SimulationOptions().model
    note = default_elsewhere(tmp_path, "old_model")
    assert "`old_model`, an earlier default" in note[0] and "has not been run yet" in note[0]
    name = next((n for n, m in OTHER_RECIPES.items() if m == default), None)
    if name is None:  # the default's rows are RESULTS.md's own
        return
    (tmp_path / name).write_text("# Results\n\n## Summary\n\n- at ε = 8: **95.5%** ± 0.1%.\n")
    note = default_elsewhere(tmp_path, "old_model")
    assert f"[{name}]({name})" in note[0] and "- at ε = 8: **95.5%** ± 0.1%." in note
    assert not any(default in line for line in other_recipes(tmp_path))


def test_results_quote_the_preparation_benchmark_or_say_it_is_missing(tmp_path: Path) -> None:
    """RESULTS.md's per-hospital preparation section is docs/benchmarks.md's `prepare` section, never a guess."""
    from bench._report import write_section
    from hemafed.network.sim.experiment import preparation

    assert "Not measured yet" in " ".join(preparation(tmp_path))
    write_section("dp_step", "## DP step\n\n| a |", tmp_path / "benchmarks.md")
    assert "Not measured yet" in " ".join(preparation(tmp_path))
    write_section("prepare", "## Preparation (`bench/prepare.py`)\n\nwhen\n\n| model | ms |\n| m | 4.2 |",
                  tmp_path / "benchmarks.md")
    lines = preparation(tmp_path)
    assert lines[0] == "## Preparation at each hospital" and "| m | 4.2 |" in lines and "| a |" not in lines
    assert sum(line.startswith("## ") for line in lines) == 1


def test_experiment_refuses_an_unknown_model_or_dp_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hemafed.gui.cli import main

    assert main(["experiment", "--model", "nope", "--out", str(tmp_path / "o")]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["experiment", "--dp-modes", "central", "--out", str(tmp_path / "o")]) == 1
    assert "the DP modes are local and/or distributed, not central" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_results_keep_each_table_of_a_bench_doc_apart_with_its_reading(tmp_path: Path) -> None:
    from hemafed.network.sim.experiment import APPEARANCE_DOC, _confidence_sections

    (tmp_path / APPEARANCE_DOC).write_text("\n".join([
        "# Hospitals", "", "Generated by a bench.", "", "| a | b |", "|---|---|", "| 1 | 2 |", "",
        "First reading.", "", "## Each hospital", "", "Intro.", "", "| c |", "|---|", "| 3 |", "",
        "Second reading.", ""]))
    lines = _confidence_sections(tmp_path)
    start = lines.index("| a | b |")
    assert lines[start:start + 11] == ["| a | b |", "|---|---|", "| 1 | 2 |", "", "First reading.", "",
                                       "**Each hospital**", "", "| c |", "|---|", "| 3 |"]
    assert lines[start + 11:start + 14] == ["", "Second reading.", ""]
