"""Per-sample gradient clipping: the part of DP-SGD that touches each record.

Two engines produce the same thing, the sum over a batch of per-sample gradients
each clipped to L2 norm `C` (plus, for diagnostics, the per-sample norms):

* ``"bk"`` (default), book-keeping: parameters do not require grad, so autograd
  computes only the gradients that flow between layers; forward hooks keep each
  layer's input, tensor hooks catch the gradient of its output, and the weight
  gradients are formed per sample from those two, once (Conv2d through a grouped
  convolution backward with one group per sample, Linear, GroupNorm). The batch
  gradient that autograd would otherwise compute next to the per-sample ones is
  never computed; the clipped sum is a weighted sum of the per-sample gradients.
  Convolutions at low resolution with many channels take the mixed ghost path
  instead: per-sample norms from the ghost-norm identity, clipped sum from one
  batch weight-gradient convolution with rescaled output gradients
  (`use_ghost_norm` picks per layer by operation count).
* ``"hooks"``: Opacus' `GradSampleModule` (autograd computes `.grad` and Opacus'
  hooks compute `.grad_sample` alongside). Kept as the reference implementation
  and for layers `"bk"` does not know.

Neither engine adds noise: that is `dp_train`'s job, with its own generator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

EngineName = Literal["bk", "hooks"]
ENGINES: tuple[str, ...] = ("bk", "hooks")
_BK_LAYERS = (nn.Conv2d, nn.Linear, nn.GroupNorm)
EPS = 1e-6

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> summed loss


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """min(1, C/‖g_i‖) per sample (Opacus' flat clipping)."""
    return (clip_norm / (norms + EPS)).clamp(max=1.0)


def conv2d_per_sample_weight_grad(m: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients (B, Cout, Cin, kh, kw) of a Conv2d, as one grouped
    convolution backward with the batch folded into the channels (one group per
    sample). Measured 3-15× faster on CPU than im2col + bmm (Opacus' path), which
    spends most of its time building the unfolded input."""
    b, cin = x.shape[:2]
    cout = grad_out.shape[1]
    # Only the weight's shape matters when the input gradient is not requested.
    weight = x.new_empty((b * cout, cin, *m.kernel_size))
    _, gw, _ = torch.ops.aten.convolution_backward(
        grad_out.reshape(1, b * cout, *grad_out.shape[2:]), x.reshape(1, b * cin, *x.shape[2:]), weight,
        None, list(m.stride), list(m.padding), list(m.dilation), False, [0, 0], b, [False, True, False])
    return gw.view(b, cout, cin, *m.kernel_size)


def use_ghost_norm(m: nn.Conv2d, grad_out: torch.Tensor) -> bool:
    """Ghost norm costs T²(d+p) per sample, materialising costs T·d·p (T output
    positions, d = Cin·kh·kw, p = Cout): deep, low-resolution layers favour the ghost norm."""
    t = grad_out.shape[2] * grad_out.shape[3]
    d = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
    return t * (d + m.out_channels) < d * m.out_channels


def conv2d_ghost_sq_norms(m: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """‖∂L_i/∂W‖² per sample without forming the gradient (Li et al. 2021, "ghost
    clipping"): Σ_{t,s} (a_t·a_s)(g_t·g_s) over the unfolded input a and output gradient g."""
    b = x.shape[0]
    a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # (B, d, T)
    g = grad_out.reshape(b, grad_out.shape[1], -1)  # (B, p, T)
    return (torch.bmm(a.transpose(1, 2), a) * torch.bmm(g.transpose(1, 2), g)).sum(dim=(1, 2))


def conv2d_clipped_weight_grad(m: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor,
                               factors: torch.Tensor) -> torch.Tensor:
    """Σ_i c_i ∂L_i/∂W as one ordinary (batch) weight-gradient convolution with scaled output gradients."""
    _, gw, _ = torch.ops.aten.convolution_backward(
        grad_out * factors.view(-1, 1, 1, 1), x, m.weight.detach(), None, list(m.stride), list(m.padding),
        list(m.dilation), False, [0, 0], m.groups, [False, True, False])
    return gw


class _Layer:
    """What one trainable layer kept for the current batch."""

    __slots__ = ("ghost_sq", "grad_out", "inp", "module", "per_sample")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inp: torch.Tensor | None = None
        self.per_sample: dict[str, torch.Tensor] | None = None
        self.ghost_sq: torch.Tensor | None = None  # per-sample squared weight-gradient norms (ghost layers)
        self.grad_out: torch.Tensor | None = None


class BookKeepingClipper:
    """Per-sample norms and clipped gradient sums for Conv2d / Linear / GroupNorm models."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: list[_Layer] = []
        self._handles = []
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            if not isinstance(module, _BK_LAYERS) or (isinstance(module, nn.Conv2d) and module.groups != 1):
                raise ValueError(f"book-keeping clipping does not support {type(module).__name__}; use 'hooks'")
            layer = _Layer(module)
            self.layers.append(layer)
            self._handles.append(module.register_forward_hook(self._forward_hook(layer)))
        self._saved_requires_grad = [p.requires_grad for p in model.parameters()]

    def _forward_hook(self, layer: _Layer):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not torch.is_grad_enabled():
                return None
            if layer.inp is not None or layer.per_sample is not None:
                # A layer applied twice per batch (shared weights) would have its per-sample
                # gradient mis-measured and the clipping bound broken: fail closed.
                raise RuntimeError(f"{type(module).__name__} used more than once in one forward pass; "
                                   "book-keeping clipping needs each layer once (use engine 'hooks')")
            layer.inp = inputs[0].detach()
            if not output.requires_grad:
                # The first layer: nothing upstream requires grad, so its output becomes
                # the leaf where the graph starts (no gradient w.r.t. the images).
                output = output.detach().requires_grad_(True)
            output.register_hook(lambda g: self._backward(layer, g))
            return output
        return hook

    def _backward(self, layer: _Layer, grad_out: torch.Tensor) -> None:
        m, x = layer.module, layer.inp
        assert x is not None
        b = x.shape[0]
        if isinstance(m, nn.Conv2d):
            layer.per_sample = {}
            if m.bias is not None:
                layer.per_sample["bias"] = grad_out.sum(dim=(2, 3))
            if use_ghost_norm(m, grad_out):
                layer.ghost_sq = conv2d_ghost_sq_norms(m, x, grad_out)
                layer.grad_out = grad_out
            else:
                layer.per_sample["weight"] = conv2d_per_sample_weight_grad(m, x, grad_out)
                layer.inp = None
        elif isinstance(m, nn.Linear) and x.dim() == 2:
            # One input vector per sample: the weight gradient is the outer product g_i x_iᵀ, whose norm
            # is ‖g_i‖·‖x_i‖ ("ghost" norm) and whose clipped sum is one matmul; never materialised
            # (for a linear head on 11,907 scattering features that is 95 k numbers per sample).
            layer.ghost_sq = grad_out.square().sum(dim=1) * x.square().sum(dim=1)
            layer.grad_out = grad_out
            layer.per_sample = {"bias": grad_out} if m.bias is not None else {}
        elif isinstance(m, nn.Linear):
            g = grad_out.reshape(b, -1, grad_out.shape[-1])
            xi = x.reshape(b, -1, x.shape[-1])
            layer.per_sample = {"weight": torch.einsum("btp,btd->bpd", g, xi)}
            if m.bias is not None:
                layer.per_sample["bias"] = g.sum(dim=1)
            layer.inp = None
        else:  # GroupNorm: recompute the normalised input, cheaper than keeping it
            assert isinstance(m, nn.GroupNorm)
            xhat = F.group_norm(x, m.num_groups, eps=m.eps)
            dims = tuple(range(2, x.dim()))
            layer.per_sample = {}
            if m.weight is not None:
                layer.per_sample["weight"] = torch.einsum("bc...,bc...->bc", xhat, grad_out)
            if m.bias is not None:
                layer.per_sample["bias"] = grad_out.sum(dim=dims)
            layer.inp = None

    def __enter__(self) -> BookKeepingClipper:
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc: object) -> None:
        for p, req in zip(self.model.parameters(), self._saved_requires_grad, strict=True):
            p.requires_grad_(req)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clipped_sum(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, clip_norm: float,
                    ) -> tuple[list[torch.Tensor], torch.Tensor, float]:
        """(clipped gradient sum per parameter, per-sample norms, summed loss) for one batch."""
        for layer in self.layers:
            layer.per_sample, layer.inp, layer.ghost_sq, layer.grad_out = None, None, None, None
        loss = loss_fn(self.model(x), y)
        loss.backward()
        missing = [type(layer.module).__name__ for layer in self.layers if layer.per_sample is None]
        if missing:
            # Every trainable layer must contribute to the norm, or a sample could escape its clip.
            raise RuntimeError(f"no per-sample gradient for {', '.join(missing)}; refusing an unclipped step")
        sq = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for layer in self.layers:
            for t in (layer.per_sample or {}).values():
                # vector_norm reads the per-sample gradients once and allocates no copy of them
                sq += torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).square()
            if layer.ghost_sq is not None:
                sq += layer.ghost_sq
        norms = sq.sqrt()
        factors = clip_factors(norms, clip_norm)
        grads: list[torch.Tensor] = []
        for layer in self.layers:
            ps = layer.per_sample or {}
            for name, p in layer.module.named_parameters(recurse=False):
                if name == "weight" and layer.ghost_sq is not None and isinstance(layer.module, nn.Linear):
                    summed = (layer.grad_out * factors[:, None]).t() @ layer.inp
                elif name == "weight" and layer.ghost_sq is not None:
                    summed = conv2d_clipped_weight_grad(layer.module, layer.inp, layer.grad_out, factors)
                else:
                    summed = torch.einsum("b,b...->...", factors, ps[name])
                grads.append(summed.reshape(p.shape))
            layer.per_sample, layer.inp, layer.ghost_sq, layer.grad_out = None, None, None, None
        return grads, norms.detach(), float(loss.detach())


class OpacusHooksClipper:
    """The same contract through Opacus' `GradSampleModule` (grad_sample_mode "hooks")."""

    def __init__(self, model: nn.Module) -> None:
        from opacus import GradSampleModule

        self.model = model
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    def __enter__(self) -> OpacusHooksClipper:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        self.gsm._close()

    def clipped_sum(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, clip_norm: float,
                    ) -> tuple[list[torch.Tensor], torch.Tensor, float]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad, p.grad_sample = None, None
        loss = loss_fn(self.gsm(x), y)
        loss.backward()
        per_sample = [p.grad_sample for p in params]
        norms = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in per_sample], dim=1).norm(dim=1)
        factors = clip_factors(norms, clip_norm)
        grads = [torch.einsum("b,b...->...", factors, g) for g in per_sample]
        for p in params:
            p.grad, p.grad_sample = None, None
        return grads, norms.detach(), float(loss.detach())


def make_clipper(model: nn.Module, engine: EngineName = "bk") -> BookKeepingClipper | OpacusHooksClipper:
    if engine == "bk":
        return BookKeepingClipper(model)
    if engine == "hooks":
        return OpacusHooksClipper(model)
    raise ValueError(f"unknown per-sample engine {engine!r}; choose one of {', '.join(ENGINES)}")
