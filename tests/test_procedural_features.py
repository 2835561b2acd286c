"""Features learned from procedurally generated images: the generator, the pre-training script
that made the shipped weights, and the model that uses them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hemafed.core.learning.cell_scenes import cell_scenes, mixed
from hemafed.core.learning.models import build_model, get_flat_params, split_features
from hemafed.core.learning.procedural_features import (
    CELLS_ENCODER_ASSET,
    CHANNELS,
    ENCODER_ASSET,
    LOOKS_ENCODER_ASSET,
    augment,
    dead_leaves,
    encoder_body,
    load_encoder,
    microscope_look,
    pretrain,
    procedural_features,
    standardise,
)


def test_dead_leaves_are_seeded_images_in_range() -> None:
    a = dead_leaves(6, torch.Generator().manual_seed(3))
    b = dead_leaves(6, torch.Generator().manual_seed(3))
    assert a.shape == (6, 3, 28, 28) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    # shapes, not flat colour: every image holds many distinct pixel values
    assert all(len(torch.unique(img)) > 20 for img in a)


def test_pretraining_saves_a_loadable_trained_encoder(tmp_path) -> None:
    out = tmp_path / "enc.npz"
    torch.manual_seed(0)
    assert pretrain(steps=3, out=out, batch=16, log_every=0) == 3
    body = load_encoder(str(out))
    assert not any(p.requires_grad for p in body.parameters())
    assert body(torch.rand(4, 3, 28, 28)).shape == (4, CHANNELS, 7, 7)
    torch.manual_seed(0)
    assert not torch.allclose(body[0][0].weight, encoder_body()[0][0].weight)  # the steps changed it


def test_pretraining_draws_its_images_from_the_scenes_it_is_given(tmp_path) -> None:
    calls = []

    def flat(n: int, gen: torch.Generator, size: int = 28) -> torch.Tensor:
        calls.append((n, size))
        return torch.rand(n, 3, 1, 1, generator=gen).expand(n, 3, size, size).clone()

    assert pretrain(steps=2, out=tmp_path / "enc.npz", batch=8, log_every=0, size=32, scenes=flat) == 2
    assert calls == [(8, 32), (8, 32)]  # one batch a step, at the size asked for, and no dead leaves


def test_dead_leaves_at_another_size_are_the_same_scene_kind_in_more_pixels() -> None:
    small = dead_leaves(32, torch.Generator().manual_seed(5))
    large = dead_leaves(32, torch.Generator().manual_seed(5), size=64)
    assert large.shape == (32, 3, 64, 64) and float(large.min()) >= 0 and float(large.max()) <= 1
    # the radii scale with the size, so resized to 28 px the large scenes look like the small ones: the share of
    # pixels that differ from a horizontal neighbour (edges) is about the same
    def edges(x: torch.Tensor) -> float:
        return float((x[..., 1:] != x[..., :-1]).any(1).float().mean())

    shrunk = torch.nn.functional.interpolate(large, size=28, mode="nearest")
    assert abs(edges(shrunk) - edges(small)) < 0.1


def test_pretraining_in_parts_resumes_to_the_same_weights(tmp_path) -> None:
    from hemafed.core.learning.procedural_features import checkpoint_path

    whole, parts = tmp_path / "whole.npz", tmp_path / "parts.npz"
    start = tmp_path / "start.npz"
    np.savez(start, **{k: v.numpy() for k, v in load_encoder().state_dict().items()})
    kw = {"batch": 8, "log_every": 0, "size": 32, "start": start, "checkpoint_every": 2}
    assert pretrain(4, whole, **kw) == 4
    # a part stopped by its time limit saves its state and writes no weights
    assert pretrain(4, parts, minutes=0.0, **kw) == 0 and not parts.exists()
    assert checkpoint_path(parts).exists()
    assert pretrain(2, parts, **kw) == 2  # (a shorter run finishes its own steps)
    assert pretrain(4, parts, **kw) == 4  # resumes at step 2
    a, b = np.load(whole), np.load(parts)
    assert all(np.array_equal(a[k], b[k]) for k in a.files)
    # it started from `start`, not from a random initialisation: the first layer moved only a little
    first = load_encoder(str(whole))[0][0].weight
    assert torch.allclose(first, load_encoder()[0][0].weight, atol=0.05)


def _view_retrieval(body: torch.nn.Module, scenes=dead_leaves) -> float:
    """Top-1: how often an image's second augmented view is the nearest to its first, among 128 `scenes`."""
    gen = torch.Generator().manual_seed(7)
    x = scenes(128, gen)
    with torch.no_grad():
        a, b = (torch.nn.functional.normalize(body(standardise(augment(x, gen))).mean((2, 3)), dim=1)
                for _ in range(2))
    return float(((a @ b.T).argmax(1) == torch.arange(128)).float().mean())


def test_shipped_encoder_learned_its_task() -> None:
    """The shipped weights tell augmented views of one synthetic image from other images far better
    than the same network untrained does."""
    torch.manual_seed(0)
    untrained = encoder_body().eval()
    assert _view_retrieval(load_encoder()) > _view_retrieval(untrained) + 0.2


@pytest.mark.parametrize("asset", [ENCODER_ASSET, LOOKS_ENCODER_ASSET, CELLS_ENCODER_ASSET])
def test_shipped_encoder_is_complete_and_deterministic(asset: str) -> None:
    body = load_encoder(asset)
    assert [k for k in body.state_dict()] == [k for k in encoder_body().state_dict()]
    x = torch.rand(5, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    f = procedural_features(x, body=body)
    assert f.shape == (5, CHANNELS, 3, 3) and torch.isfinite(f).all()
    assert torch.equal(f, procedural_features(x, body=body))
    # its weights are trained, not the random initialisation
    assert not torch.allclose(body[0][0].weight, encoder_body()[0][0].weight)


def _look_change(body: torch.nn.Module) -> float:
    """How far an image's features move when it is shown in another microscope look, relative to how far apart
    two different images' features lie (synthetic images; the median over 128)."""
    gen = torch.Generator().manual_seed(11)
    x = dead_leaves(128, gen)
    f = procedural_features(x, body=body).flatten(1)
    g = procedural_features(microscope_look(x, gen), body=body).flatten(1)
    return float(((f - g).norm(dim=1) / (f - f.roll(1, 0)).norm(dim=1)).median())


def test_looks_encoder_started_from_the_shipped_one_and_ignores_looks_more() -> None:
    shipped, looks = load_encoder(), load_encoder(LOOKS_ENCODER_ASSET)
    torch.manual_seed(0)
    untrained = encoder_body()
    # `--start assets/procedural_encoder_28.npz`: every block moved, and stayed nearer to it than a random network is
    for block in range(5):
        w, start, far = (b[block][0].weight.detach() for b in (looks, shipped, untrained))
        assert 0 < (w - start).norm() < 0.8 * (far - start).norm()
    assert _look_change(looks) < 0.8 * _look_change(shipped)
    assert _view_retrieval(looks) > _view_retrieval(encoder_body().eval()) + 0.2


def test_cells_encoder_started_from_the_looks_one_and_learned_cell_scenes() -> None:
    """`cell_scenes --start assets/procedural_encoder_28_looks.npz`: every block moved from the looks encoder, less
    than a random network lies from it; it tells cell scenes' views apart better than the looks encoder does, and
    kept its indifference to microscope looks."""
    looks, cells = load_encoder(LOOKS_ENCODER_ASSET), load_encoder(CELLS_ENCODER_ASSET)
    torch.manual_seed(0)
    untrained = encoder_body()
    for block in range(5):
        w, start, far = (b[block][0].weight.detach() for b in (cells, looks, untrained))
        assert 0 < (w - start).norm() < 0.8 * (far - start).norm()
    assert _view_retrieval(cells, cell_scenes) > _view_retrieval(looks, cell_scenes) + 0.05
    assert _look_change(cells) < 0.8 * _look_change(load_encoder())


def test_cell_scenes_are_seeded_images_with_a_centre_cell_and_mix_with_dead_leaves() -> None:
    a = cell_scenes(32, torch.Generator().manual_seed(4))
    assert a.shape == (32, 3, 28, 28) and torch.equal(a, cell_scenes(32, torch.Generator().manual_seed(4)))
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    # each scene's centre (the cell) differs from its corners (background and red cells) more than corners differ
    centre = a[:, :, 11:17, 11:17].mean((2, 3))
    corners = torch.stack([a[:, :, :4, :4], a[:, :, :4, -4:], a[:, :, -4:, :4], a[:, :, -4:, -4:]]).mean((3, 4))
    assert float((centre - corners.mean(0)).abs().mean()) > float((corners[0] - corners[3]).abs().mean())
    big = cell_scenes(4, torch.Generator().manual_seed(4), size=64)
    assert big.shape == (4, 3, 64, 64)
    m = mixed(0.25)(8, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(m[:2], cell_scenes(2, gen)) and torch.equal(m[2:], dead_leaves(6, gen))


def test_microscope_look_stays_in_range_and_differs_per_image() -> None:
    gen = torch.Generator().manual_seed(2)
    x = dead_leaves(16, gen)
    y = microscope_look(x, gen)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1 + 1e-6  # (the blur's rounding)
    change = (y - x).abs().mean((1, 2, 3))
    assert float(change.min()) > 0.005 and float(change.std()) > 0.002  # each image its own look


def test_scatter_synth_trains_only_its_head_and_depends_on_no_data() -> None:
    model = build_model("scatter_synth_28", 8, seed=0)
    features, head = split_features(model)
    assert len(get_flat_params(model)) == (243 + 128) * 9 * 8 + 8
    assert all("head" in k for k in model.state_dict())  # the encoder is not part of the shipped update
    x = torch.rand(2, 3, 28, 28)
    f = features(x)
    assert f.shape == (2, 371 * 9)
    # the same features for the same image, whatever else is in the batch (per-image normalisation)
    assert torch.allclose(features(x[:1]), f[:1], atol=1e-5)
    assert np.isfinite(head(f).detach().numpy()).all()
