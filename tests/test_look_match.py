"""Showing a hospital's images in the federation's look (`core.learning.look_match`): the search finds a known look
from the images alone, keeps images that already look alike as they are, and a model file that carries a look
answers as if its images had been taken in it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from model_files import federation_file

from hemafed.core.data.appearance import HospitalLook, apply_look
from hemafed.core.learning.cell_check import DIM, CellStats, moment_vector, standardised
from hemafed.core.learning.cell_scenes import cell_scenes
from hemafed.core.learning.look_match import MIN_IMAGES, match_look


def _cells(n: int, seed: int, size: int = 64) -> np.ndarray:
    """Computer-drawn blood-cell scenes (`core.learning.cell_scenes`) as uint8 images."""
    scenes = cell_scenes(n, torch.Generator().manual_seed(seed), size)
    return (scenes.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def _stats(images: np.ndarray) -> CellStats:
    """The cell check's statistics of `images`, as the federation estimates them (without its noise)."""
    return CellStats.from_average(moment_vector(standardised(images)).mean(0), DIM)


@pytest.fixture(scope="module")
def pbc(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 200 public PBC sample cells at 64 px, halved at random: (a hospital's images, the federation's)."""
    from hemafed.core.data.appearance import public_sample

    images = public_sample(shared_data / "pbc_sample", 64)
    order = np.random.default_rng(0).permutation(len(images))
    return images[order[:MIN_IMAGES]], images[order[MIN_IMAGES:]]


@pytest.mark.parametrize("look", [HospitalLook(haematoxylin=0.8, blur=0.4), HospitalLook(haematoxylin=1.2),
                                  HospitalLook(haematoxylin=0.9, blur=0.2),
                                  HospitalLook(eosin=0.9, brightness=1.07, blur=0.4)])
def test_the_search_finds_the_federations_stain_focus_and_lamp_from_other_unlabelled_images(
        pbc, look: HospitalLook) -> None:
    """The hospital's cells are not the federation's: only the look is shared."""
    hospital, others = pbc
    match = match_look(_stats(apply_look(others, look)), hospital)
    assert match is not None and match.images == MIN_IMAGES
    assert (match.haematoxylin, match.eosin, match.blur, match.lamp) == (
        look.haematoxylin, look.eosin, look.blur, look.brightness)
    assert match.look == look
    assert match.distance_after < 0.2 * match.distance_before


def test_images_that_already_look_like_the_federations_are_shown_as_they_come(pbc) -> None:
    hospital, others = pbc
    match = match_look(_stats(others), hospital)
    assert match is not None and match.look is None and match.distance_after == match.distance_before


def test_too_few_images_choose_no_look(pbc) -> None:
    hospital, others = pbc
    assert match_look(_stats(others), hospital[:MIN_IMAGES - 1]) is None


def test_a_calibration_keeps_its_look_and_refuses_one_out_of_range() -> None:
    from hemafed.core.learning.confidence import Calibration, look_text

    cal = Calibration.federation_only(1.2, federation_classes=[5] * 8)
    assert look_text(cal) == "" and cal.image_look() is None
    from dataclasses import replace

    looked = replace(cal, look=(0.9, 0.4), look_distance=(12.5, 1.5))
    again = Calibration.from_dict(json.loads(json.dumps(looked.to_dict())))
    assert again.look == (0.9, 0.4) and again.image_look() == HospitalLook(haematoxylin=0.9, blur=0.4)
    assert "90%" in look_text(again) and "0.4 px" in look_text(again) and "12.5 → 1.5" in look_text(again)
    focus_only = replace(looked, look=(1.0, 0.4))
    assert "haematoxylin" not in look_text(focus_only) and "a focus blur of 0.4 px" in look_text(focus_only)
    turned_down = replace(cal, look_distance=(12.5, 1.5))  # searched, found, and the labelled re-fit preferred none
    assert turned_down.image_look() is None and "predicted held-out labelled images worse" in look_text(turned_down)
    alike = replace(cal, look_distance=(0.4, 0.4))
    assert "already look like the federation's" in look_text(alike)
    full = replace(looked, look=(1.0, 0.4, 0.9, 1.07))  # eosin and lamp, as the search writes them now
    again = Calibration.from_dict(json.loads(json.dumps(full.to_dict())))
    assert again.image_look() == HospitalLook(eosin=0.9, brightness=1.07, blur=0.4)
    assert "the eosin at 90%, the lamp 7% brighter and a focus blur of 0.4 px" in look_text(again)
    for bad in ([5.0, 0.4], [1.0, 0.4, 0.9], [1.0, 0.4, 0.9, 9.0]):
        with pytest.raises(ValueError, match="look"):
            Calibration.from_dict(looked.to_dict() | {"look": bad})


def test_the_labelled_refit_keeps_the_look_only_where_held_out_images_are_predicted_at_least_as_well() -> None:
    """`recalibrate_features` compares the two re-fits by the five-fold held-out loss of what each answers with."""
    from dataclasses import replace

    from hemafed.core.learning.confidence import Calibration
    from hemafed.core.learning.local_calibration import held_out_loss

    cal = Calibration.federation_only(1.0, federation_classes=[5] * 8)
    assert held_out_loss(cal) is None
    rejected = replace(cal, offsets_loss_released=0.30, offsets_loss_refitted=0.35)
    assert held_out_loss(rejected) == 0.30  # the guard kept the released scores: those are what it answers with
    assert held_out_loss(replace(rejected, offsets_loss_refitted=0.2, head_refitted=True)) == 0.2
    assert held_out_loss(replace(rejected, offsets_loss_refitted=0.25, class_offsets=(0.1,) * 8)) == 0.25


def test_a_model_file_with_a_look_answers_as_for_images_taken_in_that_look(tmp_path: Path) -> None:
    """`hemafed classify` and the app read logits through `ModelFile.logits`: with a look in the file's calibration,
    each image is shown in it first; the cell check still measures the image as it comes."""
    from dataclasses import replace

    from hemafed.core.learning.classify import load_model_file
    from hemafed.core.learning.confidence import Calibration
    from hemafed.core.learning.models import build_model, split_features

    net = build_model("scatter_synth_inv_cc_28", 8, seed=4)
    head = split_features(net)[1]
    cal = Calibration.federation_only(1.0, federation_classes=[50] * 8)
    path = federation_file(tmp_path / "final.npz", head, "scatter_synth_inv_cc_28", cal, "look")
    looked_path = federation_file(tmp_path / "ours.npz", head, "scatter_synth_inv_cc_28",
                                  replace(cal, look=(0.8, 0.4), look_distance=(9.0, 1.0)), "look")

    images = _cells(6, seed=5, size=28)
    plain, looked = load_model_file(path), load_model_file(looked_path)
    shown = apply_look(images, HospitalLook(haematoxylin=0.8, blur=0.4))
    assert np.allclose(looked.logits(images), plain.logits(shown), atol=1e-5)
    assert not np.allclose(looked.logits(images), plain.logits(images), atol=1e-3)


def test_hemafed_calibrate_look_only_writes_the_look_from_unlabelled_images(
        tmp_path: Path, pbc, capsys: pytest.CaptureFixture[str]) -> None:
    """End to end: a federation file whose cell-check statistics are those of cells in a weaker stain and softer
    focus; a hospital folder of other cells, no class folders; the copy carries the look, the original is unchanged,
    and too few images are refused in words."""
    from PIL import Image

    from hemafed.core.learning.classify import classify_paths, load_model_file
    from hemafed.core.learning.confidence import Calibration
    from hemafed.core.learning.models import build_model, split_features
    from hemafed.gui.cli import main as cli_main

    hospital, others = pbc
    net = build_model("scatter_synth_inv_cc_28", 8, seed=4)
    head = split_features(net)[1]
    seen = standardised(apply_look(others, HospitalLook(haematoxylin=0.8, blur=0.4)))
    head.cell_moments.data.copy_(torch.as_tensor(moment_vector(seen).mean(0)))
    theirs = federation_file(tmp_path / "final.npz", head, "scatter_synth_inv_cc_28",
                             Calibration.federation_only(1.0, federation_classes=[50] * 8), "look")
    before = theirs.read_bytes()
    folder = tmp_path / "archive"
    folder.mkdir()
    for i, image in enumerate(hospital):
        Image.fromarray(image).save(folder / f"{i}.png")

    ours = tmp_path / "ours.npz"
    assert cli_main(["calibrate", "--look-only", "--model", str(theirs), str(folder), "--out", str(ours),
                     "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["images"] == MIN_IMAGES and "80%" in said["look"]
    cal = load_model_file(ours).calibration
    assert cal.look == (0.8, 0.4, 1.0, 1.0) and cal.threshold is None and cal.federation_classes == (50,) * 8
    assert theirs.read_bytes() == before
    one = [folder / "1.png"]
    assert "80%" in classify_paths(load_model_file(ours), one).to_dict()["look"]
    assert classify_paths(load_model_file(theirs), one).look is None
    from dataclasses import replace

    from hemafed.core.learning.classify import ModelFileError
    from hemafed.core.learning.local_calibration import look_only

    refitted = federation_file(tmp_path / "refitted.npz", head, "scatter_synth_inv_cc_28",
                               replace(Calibration.federation_only(1.0), head_refitted=True), "look")
    with pytest.raises(ModelFileError, match="start from the federation's file"):
        look_only(load_model_file(refitted), hospital)
    (folder / "0.png").unlink()
    assert cli_main(["calibrate", "--look-only", "--model", str(theirs), str(folder), "--out",
                     str(tmp_path / "x.npz")]) == 1
    assert "too few" in capsys.readouterr().err
