"""DP-SGD local training: per-sample clipping, noise, sampling, cancellation, evaluation."""

from __future__ import annotations

import copy
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hemafed.core.learning.dp_train import (
    LocalTrainConfig,
    LocalTrainingJob,
    TrainingCancelled,
    accuracy,
    evaluate,
    train_local,
)
from hemafed.core.learning.models import build_model, get_flat_params, num_parameters
from hemafed.core.learning.per_sample import make_clipper


def _data(n: int = 24, size: int = 28, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), (np.arange(n) % 8).astype(np.int64)


def _sum_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="sum")


@pytest.mark.parametrize("name", ["resnet_gn_28", "cnn4_28"])
@pytest.mark.parametrize("engine", ["bk", "hooks"])
def test_clipped_sum_matches_per_sample_autograd(name: str, engine: str) -> None:
    model = build_model(name, seed=0)
    x, y = _data(5)
    y_t = torch.as_tensor(y)
    clip = 2.0
    per_sample = []
    for i in range(len(y)):  # the definition: one backward per sample
        ref = copy.deepcopy(model)
        grads = torch.autograd.grad(_sum_ce(ref(x[i:i + 1]), y_t[i:i + 1]), list(ref.parameters()))
        per_sample.append(torch.cat([g.reshape(-1) for g in grads]))
    stacked = torch.stack(per_sample)
    norms = stacked.norm(dim=1)
    expected = (stacked * (clip / (norms + 1e-6)).clamp(max=1)[:, None]).sum(0)
    assert (norms > clip).any()  # the clipping is exercised

    clipper = make_clipper(model, engine)
    with clipper:
        grads, got_norms, loss = clipper.clipped_sum(x, y_t, _sum_ce, clip)
    clipper.close()
    got = torch.cat([g.reshape(-1) for g in grads])
    torch.testing.assert_close(got_norms, norms, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert loss == pytest.approx(float(_sum_ce(model(x), y_t)), rel=1e-5)
    # The model is left as it was found: trainable, no hooks.
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def _run(noise: float, noise_seed: int | None = None, seed: int = 3, **cfg) -> tuple[np.ndarray, object]:
    model = build_model("cnn4_28", seed=0)
    x, y = _data(24)
    config = LocalTrainConfig(**{"batch_size": 8, "local_steps": 3, "lr": 0.1, "clip_norm": 1.0, **cfg})
    result = train_local(model, x, y, config, noise_multiplier=noise, seed=seed, noise_seed=noise_seed)
    return result.update, result


def test_noise_seed_changes_the_update_and_runs_are_reproducible() -> None:
    a, _ = _run(1.0, noise_seed=1)
    b, _ = _run(1.0, noise_seed=2)
    c, _ = _run(1.0, noise_seed=1)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)
    # Without noise the noise seed is irrelevant.
    np.testing.assert_array_equal(_run(0.0, noise_seed=1)[0], _run(0.0, noise_seed=2)[0])


def test_result_fields() -> None:
    update, result = _run(0.7)
    assert update.dtype == np.float32 and update.shape == (num_parameters(build_model("cnn4_28")),)
    assert result.steps == 3 and result.sample_rate == pytest.approx(8 / 24)
    assert result.noise_multiplier == 0.7 and result.dp and result.n_samples == 24
    assert math.isfinite(result.mean_loss)
    assert "DP" in result.privacy_label


def test_update_is_local_minus_global() -> None:
    model = build_model("cnn4_28", seed=0)
    start = get_flat_params(model)
    x, y = _data(16)
    result = train_local(model, x, y, LocalTrainConfig(batch_size=8, local_steps=2), noise_multiplier=0.5, seed=0)
    np.testing.assert_allclose(get_flat_params(model), start + result.update, atol=1e-6)


@pytest.mark.parametrize("engine", ["bk", "hooks"])
def test_clipping_bounds_the_update(engine: str) -> None:
    # q = 1 (every record in every batch): each step moves the weights by at most
    # lr·(‖Σ clipped‖ + ‖noise‖)/N ≤ lr·(C + ‖noise‖/N).
    n, steps, lr, clip = 16, 4, 0.5, 0.05
    x, y = _data(n)
    cfg = LocalTrainConfig(batch_size=n, local_steps=steps, lr=lr, clip_norm=clip, engine=engine)
    model = build_model("cnn4_28", seed=0)
    r = train_local(model, x, y, cfg, noise_multiplier=0.0, seed=0)
    assert r.mean_batch_size == n
    assert 0 < np.linalg.norm(r.update) <= lr * steps * clip * (1 + 1e-4)
    # Non-private training of the same model moves much further: the bound is not vacuous.
    free = train_local(build_model("cnn4_28", seed=0), x, y, LocalTrainConfig(batch_size=n, local_steps=steps, lr=lr,
                       dp=False), noise_multiplier=0.0, seed=0)
    assert np.linalg.norm(free.update) > lr * steps * clip
    sigma = 2.0
    p = num_parameters(model)
    noisy = train_local(build_model("cnn4_28", seed=0), x, y, cfg, noise_multiplier=sigma, seed=0)
    noise_per_step = sigma * clip * math.sqrt(p) / n
    assert np.linalg.norm(noisy.update) <= lr * steps * (clip + 1.05 * noise_per_step)
    assert np.linalg.norm(noisy.update) >= 0.9 * lr * math.sqrt(steps) * noise_per_step - lr * steps * clip


def test_empty_poisson_batches_still_take_noisy_steps() -> None:
    model = build_model("cnn4_28", seed=0)
    x, y = _data(40)
    cfg = LocalTrainConfig(batch_size=1, local_steps=30, lr=0.1)  # q = 1/40: about a third of batches are empty
    losses: list[float] = []
    r = train_local(model, x, y, cfg, noise_multiplier=1.0, seed=0, progress=lambda i, n, loss: losses.append(loss))
    assert len(losses) == 30 and losses.count(0.0) >= 3  # an empty batch reports loss 0 and still steps
    assert np.linalg.norm(r.update) > 0


def test_non_private_is_labelled() -> None:
    update, r = _run(5.0, dp=False)
    assert not r.dp and r.noise_multiplier == 0.0 and r.privacy_label == "NON-PRIVATE"
    np.testing.assert_array_equal(update, _run(5.0, noise_seed=9, dp=False)[0])


def test_progress_and_cancel_between_steps() -> None:
    seen: list[tuple[int, int, float]] = []
    cancel = threading.Event()

    def progress(step: int, total: int, loss: float) -> None:
        seen.append((step, total, loss))
        if step == 2:
            cancel.set()

    model = build_model("cnn4_28", seed=0)
    before = get_flat_params(model)
    x, y = _data(16)
    with pytest.raises(TrainingCancelled):
        train_local(model, x, y, LocalTrainConfig(batch_size=8, local_steps=5), noise_multiplier=1.0, seed=0,
                    progress=progress, cancel=cancel)
    assert [s[:2] for s in seen] == [(1, 5), (2, 5)]
    assert all(math.isfinite(s[2]) for s in seen)
    assert not np.array_equal(before, get_flat_params(model))  # the caller discards the model


def test_training_job_runs_on_a_worker_thread() -> None:
    x, y = _data(16)
    threads: list[str] = []
    job = LocalTrainingJob(build_model("cnn4_28", seed=0), x, y, LocalTrainConfig(batch_size=8, local_steps=2),
                           noise_multiplier=1.0, seed=0,
                           progress=lambda *_: threads.append(threading.current_thread().name))
    result = job.result(timeout=120)
    assert result.steps == 2 and threads and all(t.startswith("hemafed-train") for t in threads)
    job = LocalTrainingJob(build_model("cnn4_28", seed=0), x, y, LocalTrainConfig(batch_size=8, local_steps=10_000),
                           noise_multiplier=1.0, seed=0)
    job.cancel()
    with pytest.raises(TrainingCancelled):
        job.result(timeout=120)


def test_bad_arguments() -> None:
    model = build_model("cnn4_28", seed=0)
    x, y = _data(8)
    with pytest.raises(ValueError):
        train_local(model, x, y[:4], LocalTrainConfig(), noise_multiplier=1.0)
    with pytest.raises(ValueError):
        train_local(model, x, y, LocalTrainConfig(), noise_multiplier=-1.0)
    with pytest.raises(ValueError):
        train_local(model, x, y, LocalTrainConfig(engine="nope"), noise_multiplier=1.0)  # type: ignore[arg-type]


def test_evaluate_confusion_matrix() -> None:
    model = build_model("cnn4_28", seed=0)
    x, y = _data(20)
    cm = evaluate(model, x, y, num_classes=8, batch_size=7)
    assert cm.shape == (8, 8) and cm.dtype == np.int64 and cm.sum() == 20
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(y, minlength=8))
    assert accuracy(cm) == pytest.approx(np.trace(cm) / 20)
    assert accuracy(np.zeros((8, 8), np.int64)) == 0.0
    assert accuracy(np.diag([3, 4])) == 1.0


@pytest.mark.slow
def test_short_dp_run_on_real_data_beats_the_untrained_model(shared_data) -> None:
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.models import images_to_tensor
    from hemafed.core.privacy.calibration import calibrate_sigma, sample_rate, steps_per_round

    splits = load_splits(locate(shared_data))
    rng = np.random.default_rng(0)
    tr = rng.permutation(len(splits["train"].labels))[:1500]
    te = rng.permutation(len(splits["test"].labels))[:500]
    x_tr, y_tr = images_to_tensor(splits["train"].images[tr], 28), splits["train"].labels[tr]
    x_te, y_te = images_to_tensor(splits["test"].images[te], 28), splits["test"].labels[te]
    sigma = calibrate_sigma(8.0, 1e-5, sample_rate(len(y_tr), 100), steps_per_round(len(y_tr), 100, 2))
    model = build_model("cnn4_28", seed=0)
    before = accuracy(evaluate(model, x_te, y_te))
    cfg = LocalTrainConfig(local_epochs=2, batch_size=100, lr=1.0, momentum=0.5, clip_norm=1.0)
    result = train_local(model, x_tr, y_tr, cfg, noise_multiplier=sigma, seed=0)
    after = accuracy(evaluate(model, x_te, y_te))
    assert result.dp and result.noise_multiplier == sigma > 0
    assert after > before + 0.1, (before, after)


def test_models_that_would_break_the_clip_are_refused() -> None:
    x, y = _data(8)
    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                             torch.nn.LazyLinear(8))
    bn(x)
    with pytest.raises(ValueError, match="DP-compatible"):
        train_local(bn, x, y, LocalTrainConfig(batch_size=4, local_steps=1), noise_multiplier=1.0, seed=0)

    class Shared(torch.nn.Module):  # one conv applied twice: its per-sample gradient has two parts
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.fc = torch.nn.Linear(3, 8)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(self.conv(t)).mean(dim=(2, 3)))

    with pytest.raises(RuntimeError, match="more than once"):
        train_local(Shared(), x, y, LocalTrainConfig(batch_size=4, local_steps=1), noise_multiplier=1.0, seed=0)
