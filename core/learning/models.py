"""The model registry: the only way a federation plan can name a model.

A plan carries a registry name, never code. Every model here is DP-compatible:
GroupNorm instead of BatchNorm (BatchNorm mixes samples, which breaks per-sample
clipping) and no in-place activations (per-sample gradient hooks read layer
outputs after the forward pass). `tests/test_models.py` runs Opacus'
`ModuleValidator.validate` over every entry.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.imaging import resize_array_batch
from ..trust.text import safe_text
from .feature_cache import FeatureKind
from .features import Scattering2D, dihedral, scatter_features
from .procedural_features import (
    CELLS_ENCODER_ASSET,
    LOOKS_ENCODER_ASSET,
    encoder_source,
    load_encoder,
    procedural_features,
)

# Per-channel mean/std of the BloodMNIST training split (RGB, 0..1 scale); images
# from other sources go through the same transform so all sites agree on it.
MEAN = (0.7965, 0.6600, 0.6966)
STD = (0.2159, 0.2447, 0.0926)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """torchvision's ResNet 3×3 convolution (same layer, same parameters). Defined here because
    importing torchvision pulls in torch._dynamo, sympy and triton: 1.5 s and ~170,000 Python
    objects in every site process, and in the desktop app a full garbage collection over them
    that stalled the window (docs/benchmarks.md, app-training)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """torchvision's ResNet 1×1 convolution."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups (the count must divide the channels)."""
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block with GroupNorm and out-of-place ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.gn1 = group_norm(planes)
        self.conv2 = conv3x3(planes, planes)
        self.gn2 = group_norm(planes)
        self.act = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(conv1x1(inplanes, planes, stride), group_norm(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return self.act(out + identity)


class GNResNet(nn.Module):
    """A small ResNet for low-resolution cell images: 3×3 stem, stages of basic blocks,
    global average pooling, linear head. `stem_stride` > 1 suits 64×64 input."""

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...], num_classes: int = 8,
                 stem_stride: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv3x3(3, widths[0], stem_stride), group_norm(widths[0]), nn.ReLU())
        layers: list[nn.Module] = []
        inplanes = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(count):
                layers.append(BasicBlock(inplanes, width, stride=2 if (i > 0 and j == 0) else 1))
                inplanes = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class SmallCNN(nn.Module):
    """A plain 4-convolution CNN: the fast, weaker reference."""

    def __init__(self, num_classes: int = 8, width: int = 32) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), group_norm(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *stage(3, width), *stage(width, width), nn.AvgPool2d(2),
            *stage(width, 2 * width), *stage(2 * width, 2 * width), nn.AvgPool2d(2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class ScatterNet(nn.Module):
    """Fixed scattering features (no parameters, no data went into them) + GroupNorm without
    affine terms (per image, so still data-independent) + average pooling of the 7×7 maps to
    `pool`×`pool` + a trainable head (after Tramèr & Boneh 2021).

    `features(x)` is what a site computes once for all its images; `head` is all that
    DP-SGD trains, so `parameters()` are the head's only and the flat weight vector is small.
    Pooling to 3×3 (17.5 k parameters instead of 95 k) measured the same validation accuracy at
    ε = 8 as the full 7×7 head once each has its own learning rate (docs/accuracy-levers.md), with
    5× smaller updates and faster steps.
    """

    def __init__(self, head: nn.Module, size: int = 28, j_max: int = 2, angles: int = 8, groups: int = 27,
                 pool: int = 3, tta: bool = True, orbit: bool = False) -> None:
        super().__init__()

        self.scattering = Scattering2D(size, j_max, angles)
        self.groups, self.pool = groups, pool
        self.head = head
        self.tta = tta
        self.orbit = orbit and tta

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return self._pooled(x, self.scattering, batch_size)

    def _pooled(self, x: torch.Tensor, scattering: Scattering2D, batch_size: int) -> torch.Tensor:
        f = F.group_norm(scatter_features(x, scattering, batch_size), self.groups)
        return F.adaptive_avg_pool2d(f, self.pool)

    @torch.no_grad()
    def eval_features(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Test-time augmentation: the features averaged over the 8 symmetries of the square
        (a blood cell has no orientation; the scattering grid is not exactly rotation-equivariant,
        so the 8 views differ). The head is linear, so the head of this average is exactly the
        average of the head's logits over the 8 views. Pure post-processing of the released
        model: no privacy cost. 8 feature passes per image."""

        total = self.features(x, batch_size)
        for k in range(1, 8):
            total += self.features(dihedral(x, k), batch_size)
        return total / 8

    def train_features(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """What a site computes once per image for training: one view, or with `orbit` the same
        8-view average that evaluation uses, so the head is trained on what it is judged on. Either
        way a fixed function of that one image, so a record's sensitivity is unchanged."""
        return self.eval_features(x, batch_size) if self.orbit else self.features(x, batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # evaluation (model.eval(): classify, test accuracy) averages over the 8 views
        if not self.training and self.tta:
            return self.head(self.eval_features(x))
        return self.head(self.train_features(x))


def scatter_linear(num_classes: int) -> ScatterNet:
    return ScatterNet(nn.Sequential(nn.Flatten(), nn.Linear(243 * 3 * 3, num_classes)))


class ScatterSynthNet(ScatterNet):
    """ScatterNet's scattering features side by side with those of a small CNN pre-trained on
    procedurally generated images only (`core.procedural_features`; no real image went into it,
    so it costs no privacy): 243 scattering channels pooled to 3×3 and 128 learned ones pooled to
    `learned_pool`². Only the head is trained. Validation, DP-FedSGD screen, 3 seeds: +1.5 points at
    ε = 8 and +0.4 to +0.8 at ε = 3 over `scatter_linear_28`; trained on the 8-view average
    (`orbit`) with the learned maps pooled to 2×2, +1.1 / +2.0 more (docs/accuracy-levers.md)."""

    def __init__(self, head: nn.Module, learned_pool: int = 3, orbit: bool = False, look: str | None = None,
                 encoder: str | None = None, densities: bool = False) -> None:
        super().__init__(head, orbit=orbit)
        self.learned_pool = learned_pool
        self.look = look  # each image in this canonical look first (core.data.appearance.canonical_look)
        self.encoder = encoder  # the procedural encoder's weights: a shipped asset's name (None: the first one)
        # the scattering half sees the stains' optical densities (core.data.appearance.stain_densities) instead of
        # the RGB intensities: each group of its GroupNorm then holds one stain's coefficients, so it describes
        # haematoxylin (nuclei) and eosin (granules, cytoplasm) structure apart (docs/accuracy-levers.md, tenth pass)
        self.densities = densities

    def _looked(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the image in [0, 1] for the procedural encoder, the scattering's input) of normalised images `x`, each
        in the canonical look first."""
        mean, std = _normalisation()
        plain = x * std + mean  # the procedural encoder was trained on [0, 1] images
        if self.look:
            from ..data.appearance import canonical_look

            plain = canonical_look(plain, self.look)
            x = (plain - mean) / std
        if self.densities:
            from ..data.appearance import stain_densities

            x = stain_densities(plain)
        return plain, x

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        plain, x = self._looked(x)
        learned = procedural_features(plain, batch_size, self.learned_pool, body=load_encoder(self.encoder))
        return torch.cat([super().features(x, batch_size).flatten(1), learned.flatten(1)], 1)


def scatter_synth_linear(num_classes: int) -> ScatterSynthNet:
    return ScatterSynthNet(nn.Sequential(nn.Flatten(), nn.Linear((243 + 128) * 3 * 3, num_classes)))


def block_scale(block_weights: tuple[tuple[int, float], ...], features: int) -> torch.Tensor:
    """One weight per coordinate from (coordinates, weight) pairs for consecutive blocks covering `features`."""
    if sum(n for n, _ in block_weights) != features or any(n < 1 or not w > 0 for n, w in block_weights):
        raise ValueError(f"block weights {block_weights} do not cover {features} features")
    return torch.cat([torch.full((n,), float(w)) for n, w in block_weights])


class CenteredLinear(nn.Module):
    """logits = W·(x − m) + b, with m the average feature vector of the federation's training images.

    Fixed features are far from centred (on BloodMNIST the mean is 90 % of a typical feature vector's
    norm), so under DP-SGD the isotropic noise on W acts mostly through W·m: a random, shared shift of
    every class score. Centring removes it (validation, 3 seeds: +1.8 points at ε = 8, +1.9 at ε = 3;
    docs/accuracy-levers.md). m is not trained by gradients: DP-FedSGD's first rounds
    (`FederationPlan.center_rounds_used`) estimate it as noisy sums of each record's features clipped to L2 norm
    `radius`, under exactly the protection of a training round (`core.fedsgd.clipped_round_sum`). It travels in the
    flat weight vector with W and b (`center_slice`), so a released model carries it; all zeros means "not estimated
    yet".
    """

    def __init__(self, in_features: int, out_features: int, radius: float, moments: int = 0,
                 block_weights: tuple[tuple[int, float], ...] = ()) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.center = nn.Parameter(torch.zeros(in_features), requires_grad=False)
        self.radius = float(radius)
        if moments:  # the federation's moments of the cell check's measurements (core.learning.cell_check)
            self.cell_moments = nn.Parameter(torch.zeros(moments), requires_grad=False)
        # (coordinates, weight) for consecutive blocks of the centred features: a fixed public constant, not trained
        # and not in the flat weight vector. Under DP-SGD it sets how a record's clipped gradient, and so each
        # step, is shared between the blocks (a per-block step size); see `MULTISCALE_BLOCK_WEIGHTS`.
        self.register_buffer("scale", block_scale(block_weights, in_features) if block_weights else None,
                             persistent=False)

    @property
    def centered(self) -> bool:
        return bool(self.center.detach().any())

    def center_slice(self) -> slice:
        """Where the center sits in the flat weight vector (`parameters()` order; W and b fill the rest)."""
        where = self._slice("center")
        assert where is not None, "CenteredLinear without a center"
        return where

    def moments_slice(self) -> slice | None:
        """Where the cell check's moments sit in the flat weight vector (None for a head without them)."""
        return self._slice("cell_moments")

    def _slice(self, wanted: str) -> slice | None:
        offset = 0
        for name, p in self.named_parameters():
            if name == wanted:
                return slice(offset, offset + p.numel())
            offset += p.numel()
        return None

    def centred_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What W sees: x − m, each block of coordinates times its weight."""
        x = x - self.center
        return x if self.scale is None else x * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.centred_inputs(x))


def scatter_synth_invariant(num_classes: int) -> ScatterSynthNet:
    # radius: above every feature norm on BloodMNIST's validation split (median 34.6, largest 39.0)
    return ScatterSynthNet(CenteredLinear(243 * 3 * 3 + 128 * 2 * 2, num_classes, radius=40.0),
                           learned_pool=2, orbit=True)


def scatter_synth_checked(num_classes: int, look: str | None = None, encoder: str | None = None,
                          densities: bool = False) -> ScatterSynthNet:
    """`scatter_synth_invariant` whose head also carries the cell check's moments (core.learning.cell_check)."""
    from .cell_check import MOMENT_LEN

    return ScatterSynthNet(CenteredLinear(243 * 3 * 3 + 128 * 2 * 2, num_classes, radius=40.0, moments=MOMENT_LEN),
                           learned_pool=2, orbit=True, look=look, encoder=encoder, densities=densities)


class MultiScaleNet(ScatterSynthNet):
    """64-pixel input seen at two scales: `scatter_synth_inv_28`'s features of the image resized to 28 px (scattering
    J = 2 pooled 3×3, the procedural encoder's maps pooled 2×2) beside the same encoder's maps of the 64-px image
    (16×16, pooled to `fine_pool`², GroupNorm'd per image). The encoder never saw a real image or a 64-px one; at
    64 px it sees the chromatin and granules that 28 px averages away (validation, central DP-SGD screen, 3 seeds:
    +1.1 points at ε = 8 and 3; docs/accuracy-levers.md, sixth pass). Only the head is trained."""

    COARSE = 28

    def __init__(self, head: nn.Module, fine_pool: int = 4, fine_views: tuple[int, ...] = tuple(range(8)),
                 fine_depth: int | None = None, encoder: str | None = None, densities: bool = False,
                 look: str | None = None, fine_scatter: int | None = None,
                 fine_scatter_views: tuple[int, ...] = (0, 1, 2, 3)) -> None:
        # `look`: both scales in this canonical look (core.data.appearance.canonical_look, its blur scaled to each)
        super().__init__(head, learned_pool=2, orbit=True, look=look, encoder=encoder, densities=densities)
        self.fine_pool = fine_pool
        self.fine_views = fine_views  # the dihedral views (features.dihedral) the 64-px maps are averaged over
        self.fine_depth = fine_depth  # the 64-px maps after this many encoder blocks (None: all 5)
        # a second scattering block after the others: the image resized to `fine_scatter` px (J = 2, its maps pooled
        # 3×3 to 2,187 numbers), averaged over `fine_scatter_views`; at 56 px it sees twice as fine a texture as the
        # 28-px one (docs/accuracy-levers.md, seventeenth pass)
        self.fine_scatter = fine_scatter
        self.fine_scatter_views = fine_scatter_views
        self.fine_scattering = Scattering2D(fine_scatter, 2, 8) if fine_scatter else None

    def _coarse(self, x: torch.Tensor, size: int | None = None) -> torch.Tensor:
        # antialiased bilinear, as the 28-px BloodMNIST images were made (bloodmnist/PROVENANCE.md)
        size = size or self.COARSE
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)

    def _scattered(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        x = self._looked(self._coarse(x, self.fine_scatter))[1]
        return self._pooled(x, self.fine_scattering, batch_size).flatten(1)

    def _fine(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        mean, std = _normalisation()
        plain = x * std + mean
        if self.look:
            from ..data.appearance import canonical_look

            plain = canonical_look(plain, self.look)
        return procedural_features(plain, batch_size, self.fine_pool, body=load_encoder(self.encoder),
                                   depth=self.fine_depth).flatten(1)

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        parts = [super().features(self._coarse(x), batch_size), self._fine(x, batch_size)]
        if self.fine_scattering is not None:
            parts.append(self._scattered(x, batch_size))
        return torch.cat(parts, 1)

    @torch.no_grad()
    def eval_features(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The 28-px features averaged over all 8 views, the 64-px maps over `fine_views` (the 64-px encoder pass is
        most of the cost; over the 4 rotations only it screened as good as over all 8: docs/accuracy-levers.md), the
        finer scattering (`fine_scatter`) over `fine_scatter_views`."""

        def mean(part: Callable[[torch.Tensor, int], torch.Tensor], views: tuple[int, ...]) -> torch.Tensor:
            return sum(part(dihedral(x, k), batch_size) for k in views) / len(views)

        parts = [mean(lambda v, b: ScatterSynthNet.features(self, self._coarse(v), b), tuple(range(8))),
                 mean(self._fine, self.fine_views)]
        if self.fine_scattering is not None:
            parts.append(mean(self._scattered, self.fine_scatter_views))
        return torch.cat(parts, 1)


MULTISCALE_DIM = 243 * 3 * 3 + 128 * 2 * 2 + 128 * 4 * 4
MULTISCALE_RADIUS = 60.0


# The head's weights for MultiScaleNet's three blocks (28-px scattering, 28-px procedural maps, 64-px procedural maps),
# for `CenteredLinear(block_weights=...)`. Centred, the scattering block is the smallest (median norm 6.1 against 8.8
# and 16.0 on the 64-px validation split) but the most telling per unit of norm, and a record's clipped gradient was
# shared between the blocks by their norms. Three times the weight of the others, all scaled so that the median
# centred norm stays 19.4: through the product on validation (3 seeds) +0.3 / +0.6 / +0.0 points at ε = 1 / 3 / 8
# (docs/accuracy-levers.md, fifteenth pass, with its test rows). Public constants chosen on validation: no record of a
# hospital in them.
MULTISCALE_BLOCK_WEIGHTS = ((243 * 3 * 3, 2.206), (128 * 2 * 2, 0.735), (128 * 4 * 4, 0.735))
# The same with a second scattering block (of the image at 56 px, `MultiScaleNet.fine_scatter`) after them, weighed as
# the 28-px one: 3, 1, 1, 3, scaled so that the median centred norm is 19.4 again (docs/accuracy-levers.md,
# seventeenth pass).
FINE_SCATTER_SIZE = 56
FINE_SCATTER_BLOCK_WEIGHTS = ((243 * 3 * 3, 2.008), (128 * 2 * 2, 0.669), (128 * 4 * 4, 0.669), (243 * 3 * 3, 2.008))


def multiscale_checked(num_classes: int, fine_views: tuple[int, ...] = tuple(range(8)),
                       fine_depth: int | None = None, encoder: str | None = None,
                       densities: bool = False, look: str | None = None,
                       block_weights: tuple[tuple[int, float], ...] = (),
                       fine_scatter: int | None = None) -> MultiScaleNet:
    """`MultiScaleNet` with a centred head carrying the cell check's moments (measured on the 28-px image)."""
    from .cell_check import MOMENT_LEN

    # radius: above every feature norm on BloodMNIST's 64-px validation split (8-view averages; see its test)
    dim = MULTISCALE_DIM + (243 * 3 * 3 if fine_scatter else 0)
    head = CenteredLinear(dim, num_classes, radius=MULTISCALE_RADIUS, moments=MOMENT_LEN, block_weights=block_weights)
    return MultiScaleNet(head, fine_views=fine_views, fine_depth=fine_depth, encoder=encoder, densities=densities,
                         look=look, fine_scatter=fine_scatter)


def weighted_multiscale(encoder: str) -> Callable[[int], MultiScaleNet]:
    """The default's recipe with the procedural encoder `encoder` (a shipped asset's name): 64-px images in the
    canonical lamp and focus, the stains' densities scattered at 28 px, the encoder's maps at 28 px and one block
    before its last at 64 px over the 4 rotations, the head weighing the blocks (`MULTISCALE_BLOCK_WEIGHTS`)."""
    return lambda n: multiscale_checked(n, fine_views=(0, 1, 2, 3), fine_depth=4, encoder=encoder, densities=True,
                                        look="lamp-focus", block_weights=MULTISCALE_BLOCK_WEIGHTS)


def split_features(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
    """(fixed feature map, trainable part): a site computes the first once and trains the second."""
    if isinstance(model, ScatterNet):
        return model.train_features, model.head
    return (lambda x: x), model


def evaluation_features(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fixed feature map for *evaluating* the trainable part: with test-time augmentation
    (ScatterNet.tta) the 8-view average, so `head(evaluation_features(x))` is what
    `model.eval()(x)` computes."""
    if isinstance(model, ScatterNet):
        return model.eval_features if model.tta else model.features
    return split_features(model)[0]


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: what a plan names and what a site builds from it."""

    name: str
    input_size: int  # square side in pixels
    description: str
    factory: Callable[[int], nn.Module]  # num_classes -> model
    centred: bool = False  # its head is a CenteredLinear: DP-FedSGD's first rounds estimate the feature center


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("resnet_gn_28", 28, "GroupNorm ResNet (3 stages 24/40/80, 2 blocks each, 0.28 M parameters), "
                  "28×28 input; default",
                  lambda n: GNResNet((24, 40, 80), (2, 2, 2), n)),
        ModelSpec("resnet_gn_64", 64, "GroupNorm ResNet (3 stages 32/64/128, 2 blocks each, strided stem), "
                  "64×64 input", lambda n: GNResNet((32, 64, 128), (2, 2, 2), n, stem_stride=2)),
        ModelSpec("scatter_linear_28", 28, "fixed scattering features (J=2, 8 angles; no parameters) + GroupNorm "
                  "+ 3×3 average pooling (243×3×3) + linear head (17.5 k parameters), 28×28 input; built for DP "
                  "(Tramèr & Boneh 2021)", scatter_linear),
        ModelSpec("scatter_synth_28", 28, "fixed image features that no patient data went into: wavelet "
                  "scattering, and a small network trained only on computer-generated shapes (shipped with the app); "
                  "only the final layer (26.7 k numbers) is trained, 28×28 input; built for DP",
                  scatter_synth_linear),
        ModelSpec("scatter_synth_inv_28", 28, "fixed image features that no patient data went into (wavelet "
                  "scattering, and a small network trained only on computer-generated shapes, shipped with the "
                  "app), each image's averaged over its 8 rotations and flips (a blood cell has no orientation); "
                  "only the final layer (21.6 k numbers) is trained, on features centred by the average that the "
                  "first rounds estimate under the same protection as a training round; 28×28 input; built for DP",
                  scatter_synth_invariant, centred=True),
        ModelSpec("scatter_synth_inv_cc_28", 28, "scatter_synth_inv_28 with a check for images that are not a "
                  "single blood cell: once the centre is set each record's contribution also carries its 12 image "
                  "measurements' moments, clipped with its gradient to the same norm, so the federation learns "
                  "their mean and covariance at no extra privacy cost (core.learning.cell_check); 28×28 input; "
                  "built for DP", scatter_synth_checked, centred=True),
        ModelSpec("scatter_synth_inv_cc_sn_28", 28, "scatter_synth_inv_cc_28 on stain-normalised images: each "
                  "image's background and haematoxylin and eosin densities are first mapped to a fixed public "
                  "reference (core.data.appearance), for hospitals whose stain and lamp differ; 28×28 input; "
                  "built for DP", lambda n: scatter_synth_checked(n, look="stain"), centred=True),
        ModelSpec("scatter_synth_inv_cc_lf_28", 28, "scatter_synth_inv_cc_28 on images in a canonical lamp and focus: "
                  "each image's background is first mapped to a fixed public reference (a brighter or dimmer lamp, a "
                  "tinted light) and every image is slightly blurred (focus differences matter less), for hospitals "
                  "whose microscopes differ; 28×28 input; built for DP",
                  lambda n: scatter_synth_checked(n, look="lamp-focus"), centred=True),
        ModelSpec("scatter_synth_inv_cc_lf_looks_28", 28, "scatter_synth_inv_cc_lf_28 whose shape-trained network "
                  "was trained further with every computer-generated image in a random microscope look (stain, lamp, "
                  "focus), so that its features change less between hospitals; 28×28 input; built for DP",
                  lambda n: scatter_synth_checked(n, look="lamp-focus", encoder=LOOKS_ENCODER_ASSET), centred=True),
        ModelSpec("scatter_synth_inv_cc_ms_64", 64, "scatter_synth_inv_cc_28's features of the image at 28 px "
                  "beside the shape-trained network's view of it at 64 px (finer chromatin and granules), averaged "
                  "over the 8 rotations and flips; only the final layer (38.0 k numbers) is trained, on centred "
                  "features, with the same cell check (on the 28-px image); 64×64 input; built for DP",
                  multiscale_checked, centred=True),
        ModelSpec("scatter_synth_inv_cc_ms4_64", 64, "scatter_synth_inv_cc_ms_64 with the 64-px view averaged over "
                  "the 4 rotations only (the 28-px features still over all 8 rotations and flips): about a third "
                  "less preparation per image, as accurate on validation; 64×64 input; built for DP",
                  lambda n: multiscale_checked(n, fine_views=(0, 1, 2, 3)), centred=True),
        ModelSpec("scatter_synth_inv_cc_ms4p_64", 64, "scatter_synth_inv_cc_ms4_64 with the shape-trained network's "
                  "64-px maps taken one block before its last, which was trained for 28-px shapes: at 64 px the "
                  "block before it does better on validation, with a third less 64-px work per image; "
                  "64×64 input; built for DP",
                  lambda n: multiscale_checked(n, fine_views=(0, 1, 2, 3), fine_depth=4), centred=True),
        ModelSpec("scatter_synth_inv_cc_ms4p_looks_64", 64, "scatter_synth_inv_cc_ms4p_64 with the shape-trained "
                  "network that was trained further under random microscope looks (stain, lamp, focus), at both "
                  "scales; 64×64 input; built for DP",
                  lambda n: multiscale_checked(n, fine_views=(0, 1, 2, 3), fine_depth=4, encoder=LOOKS_ENCODER_ASSET),
                  centred=True),
        ModelSpec("scatter_synth_inv_cc_lf_looks_hed_28", 28, "fixed image features that no patient data went "
                  "into (wavelet scattering of the image's haematoxylin and eosin stain densities, and a small "
                  "network trained only on computer-generated shapes shown in random microscope looks), each image "
                  "first brought to a canonical lamp and focus and its features averaged over its 8 rotations and "
                  "flips; only the final layer is trained, on centred features, with a check for images that are "
                  "not a single blood cell; 28×28 input; built for DP (scatter_synth_inv_cc_lf_looks_28 with the "
                  "stains' densities in place of red, green and blue)",
                  lambda n: scatter_synth_checked(n, look="lamp-focus", encoder=LOOKS_ENCODER_ASSET, densities=True),
                  centred=True),
        ModelSpec("scatter_synth_inv_cc_ms4p_looks_hed_64", 64, "scatter_synth_inv_cc_ms4p_looks_64 whose wavelet "
                  "scattering (of the image at 28 px) sees its haematoxylin and eosin densities apart instead of "
                  "its red, green and blue; 64×64 input; built for DP",
                  lambda n: multiscale_checked(n, fine_views=(0, 1, 2, 3), fine_depth=4, encoder=LOOKS_ENCODER_ASSET,
                                               densities=True), centred=True),
        ModelSpec("scatter_synth_inv_cc_ms4p_lf_looks_hed_64", 64, "scatter_synth_inv_cc_ms4p_looks_hed_64 with "
                  "each image first brought to a canonical lamp and focus at both scales (its background mapped to a "
                  "fixed public reference, then a slight blur: 0.5 px at 28 px, 1.14 px at 64 px), for hospitals "
                  "whose microscopes differ; 64×64 input; built for DP",
                  lambda n: multiscale_checked(n, fine_views=(0, 1, 2, 3), fine_depth=4, encoder=LOOKS_ENCODER_ASSET,
                                               densities=True, look="lamp-focus"), centred=True),
        ModelSpec("scatter_synth_inv_cc_ms4p_lf_looks_hed_bw_64", 64, "fixed image features that no patient data "
                  "went into (wavelet scattering of the image's haematoxylin and eosin stain densities at 28 px, "
                  "weighed three times, beside a small network trained only on computer-generated shapes shown in "
                  "random microscope looks, at 28 and 64 px), each image first brought to a canonical lamp and focus "
                  "and its features averaged over its rotations and flips; only the final layer is trained, on "
                  "centred features, with a check for images that are not a single blood cell; 64×64 input; built "
                  "for DP (scatter_synth_inv_cc_ms4p_lf_looks_hed_64 with its blocks weighed)",
                  weighted_multiscale(LOOKS_ENCODER_ASSET), centred=True),
        ModelSpec("scatter_synth_inv_cc_ms4p_lf_cells_hed_bw_64", 64, "fixed image features that no patient data "
                  "went into (wavelet scattering of the image's haematoxylin and eosin stain densities at 28 px, "
                  "weighed three times, beside a small network trained only on computer-generated images, half of "
                  "them shaped like a blood-cell image, shown in random microscope looks, at 28 and 64 px), each "
                  "image first brought to a canonical lamp and focus and its features averaged over its rotations "
                  "and flips; only the final layer is trained, on centred features, with a check for images that "
                  "are not a single blood cell; 64×64 input; built for DP "
                  "(scatter_synth_inv_cc_ms4p_lf_looks_hed_bw_64 with the network trained further on cell-like "
                  "scenes)",
                  weighted_multiscale(CELLS_ENCODER_ASSET), centred=True),
        ModelSpec("scatter_synth_inv_cc_ms4p_lf_looks_hed_s56_bw_64", 64,
                  "scatter_synth_inv_cc_ms4p_lf_looks_hed_bw_64 with a second wavelet scattering of the stain "
                  "densities, of the image at 56 px (twice as fine a texture as at 28 px), averaged over its 4 "
                  "rotations and weighed as the 28-px one; 64×64 input; built for DP",
                  lambda n: multiscale_checked(n, fine_views=(0, 1, 2, 3), fine_depth=4, encoder=LOOKS_ENCODER_ASSET,
                                               densities=True, look="lamp-focus", fine_scatter=FINE_SCATTER_SIZE,
                                               block_weights=FINE_SCATTER_BLOCK_WEIGHTS), centred=True),
        ModelSpec("cnn4_28", 28, "plain 4-conv GroupNorm CNN (32/64 channels), 28×28 input; fast reference",
                  lambda n: SmallCNN(n)),
    )
}
DEFAULT_MODEL = "resnet_gn_28"


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; `KeyError` names the known models."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


# Bump when the fixed feature code changes what it computes: the feature cache keys on it (with the shipped
# encoder's digest), so features computed by other code are never mixed with new ones.
FEATURE_CODE_VERSION = "2"  # 2: the procedural encoder runs channels-last (float rounding differs)


@functools.cache
def _encoder_digest(name: str | None) -> str:
    return hashlib.sha256(encoder_source(name).read_bytes()).hexdigest()[:16]


def feature_kinds(name: str, model: nn.Module):
    """The feature cache's keys (`core.learning.feature_cache.FeatureKind`) of a model's fixed map for training
    and for evaluation; None for a model without fixed features (it trains on the images)."""

    if not isinstance(model, ScatterNet):
        return None
    synth = isinstance(model, ScatterSynthNet)
    version = FEATURE_CODE_VERSION + (f"+{_encoder_digest(model.encoder)}" if synth else "")
    eval_view = "eval" if model.tta else "train"
    train_view = eval_view if model.orbit else "train"
    code = _SAME_FEATURES.get(name, name)
    label = name if code != name else ""
    return FeatureKind(code, train_view, version, label), FeatureKind(code, eval_view, version, label)


# models whose fixed features are another's (the cache serves both). The key's version carries the encoder's
# digest, so the cells model shares the looks model's feature code but never its features.
_SAME_FEATURES = {"scatter_synth_inv_cc_28": "scatter_synth_inv_28",
                  "scatter_synth_inv_cc_ms4p_lf_looks_hed_bw_64": "scatter_synth_inv_cc_ms4p_lf_looks_hed_64",
                  "scatter_synth_inv_cc_ms4p_lf_cells_hed_bw_64": "scatter_synth_inv_cc_ms4p_lf_looks_hed_64"}


def model_problems(plan) -> list[str]:
    """Why a site cannot build the model `plan` names (an unknown name, another input size); [] when it can."""

    try:
        if get_spec(plan.model).input_size != plan.input_size:
            return [f"model {plan.model} does not take {plan.input_size}-pixel input"]
    except KeyError:
        return [f"model {safe_text(plan.model, 64)} is not one this site knows"]
    return []


def build_model(name: str = DEFAULT_MODEL, num_classes: int = 8, seed: int | None = None) -> nn.Module:
    """A freshly initialised model from the registry (deterministic when `seed` is given)."""
    spec = get_spec(name)
    if seed is None:
        return spec.factory(num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.factory(num_classes)


def images_to_tensor(images: np.ndarray, spec_or_size: ModelSpec | int | str) -> torch.Tensor:
    """(N,H,W,3) uint8 images → normalised float32 (N,3,S,S), resized when needed."""

    if isinstance(spec_or_size, ModelSpec):
        size = spec_or_size.input_size
    elif isinstance(spec_or_size, str):
        size = get_spec(spec_or_size).input_size
    else:
        size = int(spec_or_size)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected (N,H,W,3) uint8 images, got {images.dtype} {images.shape}")
    if len(images) and (images.shape[1] != size or images.shape[2] != size):
        images = resize_array_batch(images, size)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = _normalisation()
    return ((x - mean) / std).contiguous()


def _normalisation() -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD as (1, 3, 1, 1) tensors: `images_to_tensor` applies them, ScatterSynthNet undoes them."""
    return torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def get_flat_params(model: nn.Module) -> np.ndarray:
    """All trainable parameters, in `model.parameters()` order, as one float32 vector."""
    with torch.no_grad():
        return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()]).numpy().copy()


def set_flat_params(model: nn.Module, vec: np.ndarray | torch.Tensor) -> None:
    """Load a flat vector produced by `get_flat_params` (same architecture) into `model`."""
    flat = torch.as_tensor(np.asarray(vec, dtype=np.float32) if not isinstance(vec, torch.Tensor) else vec)
    total = num_parameters(model)
    if flat.ndim != 1 or flat.numel() != total:
        raise ValueError(f"expected a flat vector of {total} values, got shape {tuple(flat.shape)}")
    if not torch.isfinite(flat).all():
        raise ValueError("parameter vector holds NaN or infinite values")
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p).to(p.dtype))
            offset += n


def model_hash(vec_or_model: np.ndarray | nn.Module) -> str:
    """sha256 hex of the float32 little-endian parameter vector."""
    vec = get_flat_params(vec_or_model) if isinstance(vec_or_model, nn.Module) else vec_or_model
    data = np.ascontiguousarray(np.asarray(vec, dtype="<f4"))
    return hashlib.sha256(data.tobytes()).hexdigest()
