"""Features learned from procedurally generated images: the generator, the pre-training script
that made the shipped weights, and the model that uses them."""

from __future__ import annotations

import numpy as np
import torch

from hemafed.core.learning.models import build_model, get_flat_params, split_features
from hemafed.core.learning.procedural_features import (
    CHANNELS,
    augment,
    dead_leaves,
    encoder_body,
    load_encoder,
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


def _view_retrieval(body: torch.nn.Module) -> float:
    """Top-1: how often an image's second augmented view is the nearest to its first, among 128."""
    gen = torch.Generator().manual_seed(7)
    x = dead_leaves(128, gen)
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


def test_shipped_encoder_is_complete_and_deterministic() -> None:
    body = load_encoder()
    assert [k for k in body.state_dict()] == [k for k in encoder_body().state_dict()]
    x = torch.rand(5, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    f = procedural_features(x)
    assert f.shape == (5, CHANNELS, 3, 3) and torch.isfinite(f).all()
    assert torch.equal(f, procedural_features(x))
    # its weights are trained, not the random initialisation
    assert not torch.allclose(body[0][0].weight, encoder_body()[0][0].weight)


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
