"""Book-keeping clipping: per-example clipping of every trainable weight in one backward pass.

Ghost clipping (Opacus's ``ghost`` mode) runs two backward passes: one to find each example's
gradient norm, a second to sum the gradients reweighted by their clipping factors. Book-keeping
(Bu, Mao, Xu, Zha, Karypis, "Differentially private optimization on large model at small cost",
ICML 2023) needs only the first. For a layer ``y = x W^T + b`` the gradient of example i is
``G_i = sum_t g_it x_it^T``, where ``x`` is the layer's input and ``g = dL/dy`` its output
gradient. So a backward pass that keeps each trainable layer's ``x`` and ``g`` has all it needs:

1. the norms: ``||G_i||^2 = sum_{t,s} (x_it . x_is)(g_it . g_is)`` (the "ghost norm", no
   per-example gradient), or from the per-example gradient itself when that is smaller;
2. the clipping factors ``c_i = min(1, C / (||G_i|| + 1e-6))``, over all trainable weights at once;
3. the clipped sum, ``sum_i c_i G_i = (c * g)^T x``: one matrix product per layer, the one the
   ordinary backward pass would have spent on the unclipped sum.

While the model runs under book-keeping the trainable weights are detached from autograd
(``requires_grad`` off), so the backward pass computes only the gradients that flow between
layers; the weight gradients are computed once, clipped, by step 3. The result is written to
``p.grad``: the sum of the clipped per-example gradients, which Opacus's
``DPOptimizerFastGradientClipping`` then noises and averages, exactly as after ghost clipping.

Supported layers: ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, and RMS norms (``nn.RMSNorm``,
the HF ``*RMSNorm`` classes). A model with a trainable weight in any other layer, a weight two
layers share (tied embeddings), or a layer called twice in one forward pass is refused: for each,
the per-layer norms above would not be the example's norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpops.errors import ConfigError
from dpops.models.hf import tied_trainable

MODE = "bk"


def _is_rms_norm(module: nn.Module) -> bool:
    return isinstance(module, getattr(nn, "RMSNorm", ())) or (
        type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
    )


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Embedding):
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
    return isinstance(module, (nn.Linear, nn.LayerNorm)) or _is_rms_norm(module)


def check(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of ``net`` that hold trainable weights, each supported and used by one layer only.

    Raises:
        ConfigError: naming the field and the first layer book-keeping cannot clip.
    """
    tied = tied_trainable(net)
    if tied:
        raise ConfigError(f"field 'training.grad_sample_mode': 'bk' cannot clip tied weights ({tied[:2]}); use 'hooks'")
    layers = []
    for name, module in net.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if not _supported(module):
            raise ConfigError(
                f"field 'training.grad_sample_mode': 'bk' cannot clip the trainable weights of layer {name!r} "
                f"({type(module).__name__}); use 'ghost' or 'hooks'"
            )
        layers.append((name, module))
    return layers


class BookKeeping(nn.Module):
    """Wraps ``net`` so that :meth:`backward` leaves the sum of clipped per-example gradients in ``p.grad``.

    Call the wrapper like ``net``, with a batch-first batch; then :meth:`backward` with the
    per-example losses [batch]. Outside a forward/backward pair nothing is kept.
    """

    def __init__(self, net: nn.Module, *, max_grad_norm: float) -> None:
        super().__init__()
        self._module = net
        self.max_grad_norm = float(max_grad_norm)
        self._layers = check(net)
        self._trainable = {  # layer name -> its trainable weights by name ('weight', 'bias')
            name: {pname: p for pname, p in module.named_parameters(recurse=False) if p.requires_grad}
            for name, module in self._layers
        }
        self._inputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._recording = False  # the hooks act only inside this wrapper's forward pass
        for name, module in self._layers:
            module.register_forward_hook(self._forward_hook(name))

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for weights in self._trainable.values() for p in weights.values()]

    def forward(self, *args, **kwargs):
        self._inputs.clear()
        self._grads.clear()
        for p in self.params:  # detached: the backward pass computes no weight gradient
            p.requires_grad_(False)
        self._recording = True
        try:
            return self._module(*args, **kwargs)
        finally:
            self._recording = False
            for p in self.params:
                p.requires_grad_(True)

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor):
            if not self._recording or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return None
            if name in self._inputs:
                raise ConfigError(
                    f"field 'training.grad_sample_mode': 'bk' cannot clip layer {name!r}, which runs more than once "
                    "per forward pass; use 'ghost' or 'hooks'"
                )
            self._inputs[name] = inputs[0].detach()
            if not output.requires_grad:  # nothing trainable upstream: this output starts the graph
                output = output.detach().requires_grad_(True)

            def keep(grad: torch.Tensor) -> None:
                self._grads[name] = grad.detach()

            output.register_hook(keep)
            return output

        return hook

    def backward(self, losses: torch.Tensor) -> None:
        """Backpropagate the per-example ``losses`` once and write the clipped sum to each ``p.grad``."""
        losses.sum().backward()
        missing = [name for name, _ in self._layers if name not in self._grads]
        if missing:
            raise RuntimeError(f"book-keeping: no gradient reached layer(s) {missing[:3]}")
        batch = len(losses)
        squared = torch.zeros(batch, dtype=torch.float32, device=losses.device)
        for name, module in self._layers:
            squared += self._squared_norms(module, name)
        factors = (self.max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
        for name, module in self._layers:
            self._clipped_sum(module, name, factors)
        self._inputs.clear()
        self._grads.clear()

    # ----------------------------------------------------------------- per layer type

    def _as_sequences(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and output gradient of a layer as [batch, positions, features] (float32)."""
        x, g = self._inputs[name], self._grads[name]
        if x.dim() == 2 and x.is_floating_point():
            x, g = x.unsqueeze(1), g.unsqueeze(1)
        elif x.dim() > 3:
            x, g = x.flatten(1, -2), g.flatten(1, -2)
        return x.float(), g.float()

    def _normalised(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What a norm layer's weight multiplies: its input, normalised (no affine part)."""
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, eps=module.eps)
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def _squared_norms(self, module: nn.Module, name: str) -> torch.Tensor:
        total = 0.0
        trainable = self._trainable[name]
        if isinstance(module, nn.Embedding):
            ids, g = self._inputs[name], self._grads[name].float()
            ids, g = ids.reshape(len(ids), -1), g.reshape(len(ids), -1, g.shape[-1])
            if module.padding_idx is not None:  # the padding row never gets a gradient
                g = g * (ids != module.padding_idx).unsqueeze(-1)
            same = (ids.unsqueeze(2) == ids.unsqueeze(1)).float()  # positions that update the same row
            return (same * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))
        x, g = self._as_sequences(name)
        if "bias" in trainable:
            total = total + g.sum(dim=1).pow(2).sum(dim=1)
        if "weight" not in trainable:
            return total
        if isinstance(module, nn.Linear):
            positions, d_in, d_out = x.shape[1], x.shape[2], g.shape[2]
            if positions * positions <= d_in * d_out:  # ghost norm: [batch, T, T] Gram matrices
                return total + (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))
            return total + torch.einsum("btp,btd->bpd", g, x).pow(2).sum(dim=(1, 2))
        per_example = (g * self._normalised(module, x)).sum(dim=1)  # norm layers: [batch, features]
        return total + per_example.pow(2).sum(dim=1)

    def _clipped_sum(self, module: nn.Module, name: str, factors: torch.Tensor) -> None:
        trainable = self._trainable[name]
        if isinstance(module, nn.Embedding):
            ids, g = self._inputs[name], self._grads[name]
            weighted = (g.reshape(len(ids), -1, g.shape[-1]).float() * factors[:, None, None]).reshape(-1, g.shape[-1])
            ids = ids.reshape(-1)
            if module.padding_idx is not None:
                keep = ids != module.padding_idx
                ids, weighted = ids[keep], weighted[keep]
            weight = trainable["weight"]
            _set_grad(weight, torch.zeros_like(weight).index_add_(0, ids, weighted.to(weight.dtype)))
            return
        x, g = self._as_sequences(name)
        weighted = g * factors[:, None, None]
        if "bias" in trainable:
            _set_grad(trainable["bias"], weighted.sum(dim=(0, 1)))
        if "weight" not in trainable:
            return
        if isinstance(module, nn.Linear):
            grad = weighted.reshape(-1, weighted.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        else:
            grad = (weighted * self._normalised(module, x)).sum(dim=(0, 1))
        _set_grad(trainable["weight"], grad)


def _set_grad(p: nn.Parameter, grad: torch.Tensor) -> None:
    p.grad = grad.to(p.dtype).view_as(p)



__all__ = ["MODE", "BookKeeping", "check"]
