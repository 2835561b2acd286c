"""The model registry: DP-compatible entries, flat parameter vectors, hashes, input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from hemafed.core.learning.models import (
    DEFAULT_MODEL,
    MODELS,
    build_model,
    get_flat_params,
    images_to_tensor,
    model_hash,
    num_parameters,
    set_flat_params,
)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_is_dp_compatible_and_runs(name: str) -> None:
    spec = MODELS[name]
    model = build_model(name, num_classes=8)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    out = model(torch.randn(2, 3, spec.input_size, spec.input_size))
    assert out.shape == (2, 8)
    assert spec.name == name and spec.description


def test_default_model_size() -> None:
    assert MODELS[DEFAULT_MODEL].input_size == 28
    assert 0.2e6 < num_parameters(build_model(DEFAULT_MODEL)) < 0.4e6
    assert build_model(DEFAULT_MODEL, num_classes=3)(torch.randn(1, 3, 28, 28)).shape == (1, 3)


def test_every_model_name_states_its_input_size_as_a_plan_reads_it() -> None:
    """A plan that names a model without an input size takes the size its name ends in (core.rounds.plan cannot
    import the registry), so every name must state its own."""
    from hemafed.core.rounds.plan import FederationPlan, model_input_size

    for name, spec in MODELS.items():
        assert model_input_size(name) == spec.input_size, name
        assert FederationPlan(model=name).input_size == spec.input_size
    assert model_input_size("big") == 28 and FederationPlan(model="cnn4_28", input_size=64).input_size == 64


def test_unknown_model() -> None:
    with pytest.raises(KeyError, match="known"):
        build_model("resnet152")


def test_seeded_build_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    a = get_flat_params(build_model(DEFAULT_MODEL, seed=1))
    assert torch.rand(1) == expected_next
    b = get_flat_params(build_model(DEFAULT_MODEL, seed=1))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, get_flat_params(build_model(DEFAULT_MODEL, seed=2)))


def test_flat_params_round_trip_and_hash() -> None:
    src, dst = build_model("cnn4_28", seed=1), build_model("cnn4_28", seed=2)
    vec = get_flat_params(src)
    assert vec.dtype == np.float32 and vec.shape == (num_parameters(src),)
    assert model_hash(src) != model_hash(dst)
    set_flat_params(dst, vec)
    assert model_hash(dst) == model_hash(src) == model_hash(vec)
    assert len(model_hash(vec)) == 64
    with pytest.raises(ValueError):
        set_flat_params(dst, vec[:-1])
    bad = vec.copy()
    bad[0] = np.nan
    with pytest.raises(ValueError):
        set_flat_params(dst, bad)


def test_images_to_tensor() -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    x = images_to_tensor(imgs, MODELS[DEFAULT_MODEL])
    assert x.shape == (4, 3, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 3
    assert images_to_tensor(imgs, "resnet_gn_64").shape == (4, 3, 64, 64)
    assert images_to_tensor(imgs, 32).shape == (4, 3, 32, 32)
    with pytest.raises(ValueError):
        images_to_tensor(imgs.astype(np.float32), 28)


@pytest.mark.parametrize("name", ["scatter_linear_28", "scatter_synth_28"])
def test_scatter_test_time_augmentation_averages_the_eight_views(name: str) -> None:
    """In eval mode a scatter_* model averages its logits over the 8 symmetries of the square
    (its head is linear, so averaging the features is the same thing); the result is therefore
    exactly invariant to rotating or flipping the image, and training mode sees one view."""
    from hemafed.core.learning.features import dihedral
    from hemafed.core.learning.models import evaluation_features, split_features

    torch.manual_seed(0)
    model = build_model(name, 8)
    x = torch.randn(3, 3, 28, 28)
    features, head = split_features(model)
    model.eval()
    with torch.no_grad():
        views = torch.stack([head(features(dihedral(x, k))) for k in range(8)])
        tta = model(x)
        assert torch.allclose(tta, views.mean(0), atol=1e-5)
        assert torch.allclose(head(evaluation_features(model)(x)), tta, atol=1e-6)
        for k in (1, 4, 6):
            assert torch.allclose(model(dihedral(x, k)), tta, atol=1e-4)
        # the single views really differ (otherwise the averaging would be pointless)
        assert (views[0] - views[1]).abs().max() > 1e-3
        model.train()
        assert torch.allclose(model(x), views[0], atol=1e-5)


def test_invariant_model_trains_on_what_it_is_evaluated_on() -> None:
    """scatter_synth_inv_28: a site's training input for an image is the 8-view average that
    evaluation uses — a fixed function of that image alone, identical for all its rotations and flips."""
    from hemafed.core.learning.features import dihedral
    from hemafed.core.learning.models import evaluation_features, split_features

    model = build_model("scatter_synth_inv_28", 8, seed=0)
    features, _ = split_features(model)
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    f = features(x)
    # the feature center, then W and b (core.models.CenteredLinear)
    assert f.shape == (3, 243 * 9 + 128 * 4) and len(get_flat_params(model)) == f.shape[1] * 9 + 8
    assert torch.allclose(f, evaluation_features(model)(x), atol=1e-6)
    for k in (1, 5):
        assert torch.allclose(features(dihedral(x, k)), f, atol=1e-4)
    assert torch.allclose(features(x[:1]), f[:1], atol=1e-5)  # per image, whatever else is in the batch
    with torch.no_grad():
        model.eval()
        evaluated = model(x)
        model.train()
        assert torch.allclose(model(x), evaluated, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_says_which_models_have_a_feature_center(name: str) -> None:
    from hemafed.core.learning.models import CenteredLinear, split_features

    head = split_features(build_model(name, 8))[1]
    assert MODELS[name].centred == isinstance(head, CenteredLinear)


def test_multiscale_model_sees_the_28_px_image_and_the_64_px_one() -> None:
    """scatter_synth_inv_cc_ms_64: its first features are scatter_synth_inv_28's of the image resized to 28 px
    (antialiased bilinear, as BloodMNIST's 28-px images were made), then the procedural encoder's 64-px maps
    pooled 4×4; 8-view averages for training and evaluation, so rotations and flips give the same vector."""
    import torch.nn.functional as F

    from hemafed.core.learning.features import dihedral
    from hemafed.core.learning.models import MULTISCALE_DIM, MultiScaleNet, evaluation_features, split_features

    model = build_model("scatter_synth_inv_cc_ms_64", 8, seed=0)
    assert isinstance(model, MultiScaleNet) and MODELS["scatter_synth_inv_cc_ms_64"].input_size == 64
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    features, head = split_features(model)
    f = features(x)
    assert f.shape == (2, MULTISCALE_DIM) == (2, 243 * 9 + 128 * 4 + 128 * 16)
    assert torch.allclose(f, evaluation_features(model)(x), atol=1e-6)
    assert torch.allclose(features(dihedral(x, 3)), f, atol=1e-4)
    coarse = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    small = build_model("scatter_synth_inv_28", 8, seed=0)
    assert torch.allclose(f[:, :243 * 9 + 128 * 4], split_features(small)[0](coarse), atol=1e-5)
    # the 64-px part is not the 28-px encoder's view again: it changes when only fine detail does
    detail = x + 0.2 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(4)))
    fine = features(detail)[:, 243 * 9 + 128 * 4:] - f[:, 243 * 9 + 128 * 4:]
    assert fine.abs().max() > 1e-2
    assert len(get_flat_params(head)) == MULTISCALE_DIM * 9 + 8 + len(head.cell_moments)


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["scatter_synth_inv_cc_ms_64", "scatter_synth_inv_cc_ms4p_64",
                                  "scatter_synth_inv_cc_ms4p_looks_64",
                                  "scatter_synth_inv_cc_ms4p_lf_looks_hed_s56_bw_64"])
def test_multiscale_radius_is_above_the_feature_norms_of_real_64_px_cells(shared_data, name: str) -> None:
    """The centring round clips each record's feature vector to the head's radius: it should clip none of
    BloodMNIST's (8-view averages of 64-px validation images: median 52.4, largest 57.2 over all 1,712; with the
    4th block's maps over 4 rotations: median 51.7, largest 57.1)."""
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.models import MULTISCALE_RADIUS, split_features

    npz = locate(shared_data, size=64)
    if "64" not in npz.name:
        pytest.skip("bloodmnist_64.npz is not in the shared data")
    images = load_splits(npz)["val"].images[::9]
    model = build_model(name, 8)
    norms = split_features(model)[0](images_to_tensor(images, 64)).norm(dim=1)
    assert split_features(model)[1].radius == MULTISCALE_RADIUS
    assert float(norms.median()) > 45 and float(norms.max()) < MULTISCALE_RADIUS


def test_the_faster_64_px_model_averages_its_64_px_maps_over_the_four_rotations() -> None:
    """scatter_synth_inv_cc_ms4_64: the same 28-px features as scatter_synth_inv_cc_ms_64 (8 views), the 64-px maps
    averaged over the 4 rotations only; so rotating the image changes nothing, and a flip changes the 64-px part."""
    from hemafed.core.learning.features import dihedral
    from hemafed.core.learning.models import evaluation_features, split_features

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    full = build_model("scatter_synth_inv_cc_ms_64", 8, seed=0)
    fast = build_model("scatter_synth_inv_cc_ms4_64", 8, seed=0)
    coarse = 243 * 9 + 128 * 4
    f, g = split_features(full)[0](x), split_features(fast)[0](x)
    assert torch.equal(f[:, :coarse], g[:, :coarse]) and not torch.allclose(f[:, coarse:], g[:, coarse:])
    rotations = torch.stack([fast.features(dihedral(x, k))[:, coarse:] for k in range(4)]).mean(0)
    assert torch.allclose(g[:, coarse:], rotations, atol=1e-5)
    assert torch.allclose(evaluation_features(fast)(x), g)
    assert torch.allclose(split_features(fast)[0](dihedral(x, 3)), g, atol=1e-4)
    assert (split_features(fast)[0](dihedral(x, 4))[:, coarse:] - g[:, coarse:]).abs().max() > 1e-3


def test_the_penultimate_block_64_px_model_takes_the_encoders_maps_one_block_earlier() -> None:
    """scatter_synth_inv_cc_ms4p_64: scatter_synth_inv_cc_ms4_64's 28-px features, and the shipped encoder's 64-px
    maps after its first 4 blocks (128 channels, 16×16) instead of all 5, pooled 4×4, over the 4 rotations."""
    import torch.nn.functional as F

    from hemafed.core.learning.features import dihedral
    from hemafed.core.learning.models import MULTISCALE_DIM, _normalisation, split_features
    from hemafed.core.learning.procedural_features import GROUPS, load_encoder, standardise

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    last = split_features(build_model("scatter_synth_inv_cc_ms4_64", 8, seed=0))[0](x)
    fourth = split_features(build_model("scatter_synth_inv_cc_ms4p_64", 8, seed=0))[0](x)
    coarse = 243 * 9 + 128 * 4
    assert fourth.shape == (2, MULTISCALE_DIM) and torch.equal(fourth[:, :coarse], last[:, :coarse])
    mean, std = _normalisation()
    body = load_encoder()[:4]
    with torch.no_grad():
        maps = [F.group_norm(F.adaptive_avg_pool2d(body(standardise(dihedral(x, k) * std + mean)), 4), GROUPS)
                for k in range(4)]
    assert torch.allclose(fourth[:, coarse:], (sum(maps) / 4).flatten(1), atol=1e-5)
    assert (fourth[:, coarse:] - last[:, coarse:]).abs().max() > 0.1


def test_the_block_weighted_model_reads_the_same_cached_features_and_weighs_the_scattering_three_times() -> None:
    """`…_bw_64` is `…_lf_looks_hed_64` with weights in its head only: the same fixed features (one cache entry
    serves both) and flat weight vector, the scattering block weighed three times the procedural maps."""
    from hemafed.core.learning.models import (
        MULTISCALE_BLOCK_WEIGHTS,
        MULTISCALE_DIM,
        build_model,
        feature_kinds,
        num_parameters,
        split_features,
    )

    plain, weighted = "scatter_synth_inv_cc_ms4p_lf_looks_hed_64", "scatter_synth_inv_cc_ms4p_lf_looks_hed_bw_64"
    a, b = build_model(plain), build_model(weighted)
    assert feature_kinds(plain, a) == feature_kinds(weighted, b)
    assert num_parameters(split_features(a)[1]) == num_parameters(split_features(b)[1])
    assert split_features(a)[1].scale is None
    scale = split_features(b)[1].scale.tolist()
    assert len(scale) == MULTISCALE_DIM and sum(n for n, _ in MULTISCALE_BLOCK_WEIGHTS) == MULTISCALE_DIM
    scatter, coarse, _ = MULTISCALE_BLOCK_WEIGHTS
    assert scale[0] == scale[scatter[0] - 1] == pytest.approx(3 * scale[-1], rel=1e-3)
    assert scale[scatter[0]] == scale[scatter[0] + coarse[0]] == scale[-1]


def test_the_cells_model_is_the_looks_model_with_the_cells_encoder_and_its_own_cache_entry() -> None:
    """`…_lf_cells_hed_bw_64`: the same scattering block and head as `…_lf_looks_hed_bw_64`, the procedural maps
    from the encoder pre-trained on cell scenes; the feature cache keys them apart by the encoder's digest."""
    from hemafed.core.learning.models import MULTISCALE_BLOCK_WEIGHTS, feature_kinds, split_features

    looks, cells = "scatter_synth_inv_cc_ms4p_lf_looks_hed_bw_64", "scatter_synth_inv_cc_ms4p_lf_cells_hed_bw_64"
    a, b = build_model(looks, 8, seed=0), build_model(cells, 8, seed=0)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    fa, fb = split_features(a)[0](x), split_features(b)[0](x)
    scatter = MULTISCALE_BLOCK_WEIGHTS[0][0]
    assert fa.shape == fb.shape and torch.equal(fa[:, :scatter], fb[:, :scatter])
    assert (fa[:, scatter:] - fb[:, scatter:]).abs().max() > 1e-2
    assert torch.equal(split_features(a)[1].scale, split_features(b)[1].scale)
    (ka, _), (kb, _) = feature_kinds(looks, a), feature_kinds(cells, b)
    assert ka.version != kb.version
    # both share the looks model's feature code; the cache's log names the model the operator chose
    assert ka.model == kb.model == "scatter_synth_inv_cc_ms4p_lf_looks_hed_64"
    assert (ka.label, kb.label) == (looks, cells)


def test_the_56_px_scattering_model_adds_a_finer_scattering_block_after_the_default_features() -> None:
    """`…_s56_bw_64`: the default model's 4,747 features unchanged, then the wavelet scattering (J = 2, pooled 3×3)
    of the stain densities of the image resized to 56 px in the canonical lamp and focus, over its 4 rotations; the
    head weighs both scattering blocks three times the procedural maps."""
    import torch.nn.functional as F

    from hemafed.core.data.appearance import canonical_look, stain_densities
    from hemafed.core.learning.features import Scattering2D, dihedral, scatter_features
    from hemafed.core.learning.models import (
        FINE_SCATTER_BLOCK_WEIGHTS,
        MULTISCALE_DIM,
        _normalisation,
        split_features,
    )

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    default = split_features(build_model("scatter_synth_inv_cc_ms4p_lf_looks_hed_bw_64", 8, seed=0))[0](x)
    features, head = split_features(build_model("scatter_synth_inv_cc_ms4p_lf_looks_hed_s56_bw_64", 8, seed=0))
    f = features(x)
    assert f.shape == (2, MULTISCALE_DIM + 243 * 9) and torch.equal(f[:, :MULTISCALE_DIM], default)
    mean, std = _normalisation()
    scattering = Scattering2D(56, 2, 8)
    views = []
    for k in range(4):
        small = F.interpolate(dihedral(x, k), size=(56, 56), mode="bilinear", antialias=True, align_corners=False)
        looked = stain_densities(canonical_look(small * std + mean, "lamp-focus"))
        views.append(F.adaptive_avg_pool2d(F.group_norm(scatter_features(looked, scattering), 27), 3).flatten(1))
    assert torch.allclose(f[:, MULTISCALE_DIM:], sum(views) / 4, atol=1e-5)
    assert torch.allclose(features(dihedral(x, 1)), f, atol=1e-4)
    assert (features(dihedral(x, 4))[:, MULTISCALE_DIM:] - f[:, MULTISCALE_DIM:]).abs().max() > 1e-3
    scale = head.scale.tolist()
    assert [n for n, _ in FINE_SCATTER_BLOCK_WEIGHTS] == [243 * 9, 128 * 4, 128 * 16, 243 * 9]
    assert scale[0] == scale[-1] == pytest.approx(3 * scale[243 * 9], rel=1e-3)
    assert len(get_flat_params(head)) == (MULTISCALE_DIM + 243 * 9) * 9 + 8 + len(head.cell_moments)
