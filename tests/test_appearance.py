"""Hospitals whose images look different: the simulated looks stay in their documented range and replay from the
seed, the test split is never touched, stain normalisation undoes a stain and lamp change, and the canonical lamp
and focus undo a lamp change and narrow a focus change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hemafed.core.data.appearance import (
    LOOK_RANGE,
    HospitalLook,
    apply_look,
    canonical_look,
    hospital_looks,
    normalise_stain,
)
from tests.test_cell_check import cells


def test_looks_replay_from_the_seed_and_stay_in_range() -> None:
    looks = hospital_looks(10, 3)
    assert looks == hospital_looks(10, 3) and looks != hospital_looks(10, 4)
    for look in looks:
        assert LOOK_RANGE["haematoxylin"][0] <= look.haematoxylin <= LOOK_RANGE["haematoxylin"][1]
        assert LOOK_RANGE["blur"][0] <= look.blur <= LOOK_RANGE["blur"][1]
        assert LOOK_RANGE["zoom"][0] <= look.zoom <= LOOK_RANGE["zoom"][1]


def test_the_reference_look_changes_nothing_and_others_change_the_image() -> None:
    images = cells(4, 0)
    same = apply_look(images, HospitalLook())
    assert np.abs(same.astype(int) - images).max() <= 1  # rounding only
    for look in hospital_looks(5, 0):
        changed = apply_look(images, look)
        assert changed.shape == images.shape and changed.dtype == np.uint8
        assert np.abs(changed.astype(int) - images).mean() > 1.0


def _mapped(images: np.ndarray, mapping=normalise_stain) -> np.ndarray:
    """(N, H, W, 3) uint8 images through a per-image mapping of [0, 1] tensors, in grey levels."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    return mapping(x).permute(0, 2, 3, 1).numpy() * 255.0


def _canonical(images: np.ndarray) -> np.ndarray:
    return _mapped(images, lambda x: canonical_look(x, "lamp-focus"))


def test_stain_normalisation_undoes_a_stain_and_lamp_change() -> None:
    images = cells(8, 1)
    look = HospitalLook(haematoxylin=1.25, eosin=0.75, tint_h=0.03, tint_e=-0.03, brightness=0.88)
    shifted = apply_look(images, look)
    before = np.abs(shifted.astype(float) - images).mean()
    after = np.abs(_mapped(shifted) - _mapped(images)).mean()
    assert after < before / 3, (before, after)


def test_canonical_lamp_and_focus_undo_a_lamp_change_and_narrow_a_focus_change() -> None:
    images = cells(8, 1)
    for look in (HospitalLook(brightness=0.86), HospitalLook(tint_h=0.04, tint_e=-0.04)):
        shifted = apply_look(images, look)
        before = np.abs(shifted.astype(float) - images).mean()
        after = np.abs(_canonical(shifted) - _canonical(images)).mean()
        assert after < before / 3, (look, before, after)
    blurred = apply_look(images, HospitalLook(blur=LOOK_RANGE["blur"][1]))
    before = np.abs(blurred.astype(float) - images).mean()
    after = np.abs(_canonical(blurred) - _canonical(images)).mean()
    assert after < 0.85 * before, (before, after)  # by about a fifth in grey levels (BloodMNIST's images alike)
    # the stain itself (which tells the classes apart) is kept: a stronger haematoxylin still shows
    stained = apply_look(images, HospitalLook(haematoxylin=1.3))
    assert np.abs(_canonical(stained) - _canonical(images)).mean() > 0.5 * np.abs(stained.astype(float) - images).mean()


def test_a_canonical_look_is_a_model_option() -> None:
    from hemafed.core.learning.models import build_model, images_to_tensor

    x = images_to_tensor(cells(4, 3), 28)
    plain = build_model("scatter_synth_inv_cc_28").features(x)
    canonical = build_model("scatter_synth_inv_cc_lf_28").features(x)
    assert plain.shape == canonical.shape and not torch.allclose(plain, canonical)


@pytest.mark.parametrize(("first", "looks", "size"), [
    ("scatter_synth_inv_cc_lf_28", "scatter_synth_inv_cc_lf_looks_28", 28),
    ("scatter_synth_inv_cc_ms4p_64", "scatter_synth_inv_cc_ms4p_looks_64", 64),
])
def test_the_looks_encoder_changes_only_the_learned_features_and_their_cache_key(first: str, looks: str,
                                                                                 size: int) -> None:
    from hemafed.core.learning.models import build_model, feature_kinds, images_to_tensor

    x = images_to_tensor(cells(4, 3), size)
    lf, looks = build_model(first), build_model(looks)
    a, b = lf.features(x), looks.features(x)
    scattering = 243 * 3 * 3  # the fixed wavelet part comes first and has no encoder
    assert torch.equal(a[:, :scattering], b[:, :scattering])
    assert not torch.allclose(a[:, scattering:], b[:, scattering:])
    # features of one encoder are never served from the cache for the other
    (ka, _), (kb, _) = feature_kinds(first, lf), feature_kinds("x", looks)
    assert ka.version != kb.version


def test_a_shifted_simulation_changes_the_hospitals_images_but_not_the_test_split(shared_data) -> None:
    from hemafed.network.sim.simulate import SimulationOptions, hospitals

    same = hospitals(SimulationOptions(data=shared_data, subset=400, test_subset=50))
    shifted = hospitals(SimulationOptions(data=shared_data, subset=400, test_subset=50, appearance="shifted"))
    np.testing.assert_array_equal(same.test.images, shifted.test.images)
    np.testing.assert_array_equal(same.train.labels, shifted.train.labels)
    for idx in same.parts:
        assert np.abs(same.train.images[idx].astype(int) - shifted.train.images[idx]).mean() > 1.0


def test_blur_is_the_same_focus_at_64_px() -> None:
    """The look's blur σ is given at 28 px: a 64-px image of the same cell is blurred over 64/28 times as many pixels,
    so blurring at 64 px and resizing to 28 px is close to blurring the 28-px image."""
    from PIL import Image

    def resize(images: np.ndarray, side: int) -> np.ndarray:
        return np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BILINEAR))
                         for im in images])

    large = resize(cells(8, 2), 64)
    small = resize(large, 28)
    look = HospitalLook(blur=0.8)
    blurred_small = apply_look(small, look).astype(float)
    assert np.abs(blurred_small - small).mean() > 2.0  # the blur is visible at 28 px
    gap = np.abs(resize(apply_look(large, look), 28).astype(float) - blurred_small).mean()
    old = np.abs(resize(apply_look(large, HospitalLook(blur=0.8 * 28 / 64)), 28).astype(float) - blurred_small).mean()
    assert gap < 0.5 * old and gap < 1.0, (gap, old)


def test_stain_densities_turn_a_stain_strength_into_a_scale_of_one_channel() -> None:
    """Unmixed optical densities: a haematoxylin twice as strong doubles the first channel and leaves the eosin one,
    and the scattering half's GroupNorm (one stain's coefficients per group) then sees the same image."""
    from hemafed.core.data.appearance import HED_FROM_RGB, RGB_FROM_HED, stain_densities

    gen = torch.Generator().manual_seed(0)
    hed = torch.rand(2, 3, 28, 28, generator=gen) * torch.tensor([0.6, 0.4, 0.0])[None, :, None, None]

    def image(densities: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.einsum("bshw,sc->bchw", densities, torch.as_tensor(RGB_FROM_HED).float()))

    np.testing.assert_allclose(RGB_FROM_HED @ HED_FROM_RGB, np.eye(3), atol=1e-12)
    back = stain_densities(image(hed))
    assert torch.allclose(back[:, :2], hed[:, :2], atol=1e-4)
    stronger = stain_densities(image(hed * torch.tensor([2.0, 1.0, 1.0])[None, :, None, None]))
    assert torch.allclose(stronger[:, 0], 2 * back[:, 0], atol=1e-4)
    assert torch.allclose(stronger[:, 1], back[:, 1], atol=1e-4)


def test_the_density_model_changes_only_the_scattering_half_and_its_cache_key() -> None:
    from hemafed.core.learning.models import build_model, feature_kinds, images_to_tensor

    x = images_to_tensor(cells(4, 3), 28)
    rgb, hed = build_model("scatter_synth_inv_cc_lf_looks_28"), build_model("scatter_synth_inv_cc_lf_looks_hed_28")
    a, b = rgb.features(x), hed.features(x)
    scattering = 243 * 3 * 3
    assert a.shape == b.shape and torch.equal(a[:, scattering:], b[:, scattering:])
    assert not torch.allclose(a[:, :scattering], b[:, :scattering])
    (ka, _), (kb, _) = feature_kinds("scatter_synth_inv_cc_lf_looks_28", rgb), \
        feature_kinds("scatter_synth_inv_cc_lf_looks_hed_28", hed)
    assert ka != kb
    # the 64-px variant: the same densities in its 28-px scattering, the 64-px maps untouched
    x64 = images_to_tensor(cells(2, 4, size=64), 64)
    m, mh = build_model("scatter_synth_inv_cc_ms4p_looks_64"), build_model("scatter_synth_inv_cc_ms4p_looks_hed_64")
    f, g = m.features(x64), mh.features(x64)
    assert torch.equal(f[:, scattering:], g[:, scattering:])
    assert not torch.allclose(f[:, :scattering], g[:, :scattering])


def test_the_64_px_canonical_look_model_maps_both_scales_and_a_lamp_change_moves_it_less() -> None:
    """Both halves of the 64-px model see the canonical look (its blur scaled to each half's size), so a dimmer lamp
    moves its features much less than the same model's without it, and it has its own cache key."""
    from hemafed.core.learning.models import _normalisation, build_model, feature_kinds, images_to_tensor

    images = cells(4, 3, size=64)
    plain = build_model("scatter_synth_inv_cc_ms4p_looks_hed_64")
    lf = build_model("scatter_synth_inv_cc_ms4p_lf_looks_hed_64")
    x = images_to_tensor(images, 64)
    mean, std = _normalisation()
    fine = 128 * 4 * 4  # the 64-px maps come last
    # the 64-px half is the plain model's of the image in the canonical look at 64 px
    mapped = (canonical_look(x * std + mean, "lamp-focus") - mean) / std
    assert torch.allclose(lf.features(x)[:, -fine:], plain.features(mapped)[:, -fine:], atol=1e-5)
    dim = apply_look(images, HospitalLook(brightness=0.86))

    def moved(model) -> float:
        a, b = model.features(x), model.features(images_to_tensor(dim, 64))
        return float((a - b).norm(dim=1).mean() / a.norm(dim=1).mean())

    assert moved(lf) < 0.5 * moved(plain), (moved(lf), moved(plain))
    assert feature_kinds("scatter_synth_inv_cc_ms4p_lf_looks_hed_64", lf)[0] != \
        feature_kinds("scatter_synth_inv_cc_ms4p_looks_hed_64", plain)[0]
