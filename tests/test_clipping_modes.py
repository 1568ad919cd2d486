"""The clipping modes are a registry: one registered function per ``training.grad_sample_mode``.

The registry must hold exactly the modes the job config admits (a mode the config accepts but no
function wraps would fail only once the charge is running; a registered mode the config refuses is
dead code), refuse an unknown mode naming the field, refuse a second definition of a mode, and each
entry's flags must say what its wrapper really does.
"""

from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

from dpops.config.schema import TrainingSettings
from dpops.errors import ConfigError
from dpops.train import private_step

N, C = 4, 1e-3  # a bound far below every per-example gradient's norm: every example is clipped


def _literal_modes() -> set[str]:
    annotation = TrainingSettings.model_fields["grad_sample_mode"].annotation
    literals = [a for a in typing.get_args(annotation) if typing.get_origin(a) is typing.Literal]
    assert len(literals) == 1, f"training.grad_sample_mode is not Optional[Literal[...]]: {annotation}"
    return set(typing.get_args(literals[0]))


def _private(net: nn.Module, mode: str) -> private_step.PrivateModel:
    params = [p for p in net.parameters() if p.requires_grad]
    return private_step.make_private(net, torch.optim.SGD(params, lr=0.0), task="classification", mode=mode,
                                     noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=N)


def test_the_registry_holds_exactly_the_modes_the_config_admits():
    assert set(private_step.CLIPPING_MODES) == _literal_modes()
    assert all(name == mode.name for name, mode in private_step.CLIPPING_MODES.items())
    assert set(private_step.CLIPPED_IN_BACKWARD) == {
        name for name, mode in private_step.CLIPPING_MODES.items() if mode.clips_in_backward}


def test_an_unknown_mode_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"field 'training.grad_sample_mode': 'ew' is not a clipping mode"):
        private_step.clipping_mode("ew")
    with pytest.raises(ConfigError, match="training.grad_sample_mode"):
        _private(nn.Linear(3, 2), "ew")


def test_a_mode_registered_twice_is_refused_and_the_first_definition_kept(monkeypatch):
    monkeypatch.setattr(private_step, "CLIPPING_MODES", dict(private_step.CLIPPING_MODES))
    ghost = private_step.CLIPPING_MODES["ghost"]
    with pytest.raises(ValueError, match="clipping mode 'ghost' is registered already"):
        @private_step.register_clipping_mode("ghost", clips_in_backward=False)
        def other(net, *, max_grad_norm):
            return net
    assert private_step.clipping_mode("ghost") is ghost

    wrapped = []

    @private_step.register_clipping_mode("plain_hooks", clips_in_backward=False)
    def plain_hooks(net, *, max_grad_norm):  # a new mode: one function, found by make_private
        wrapped.append(max_grad_norm)
        return ghost_free_hooks(net, max_grad_norm=max_grad_norm)

    ghost_free_hooks = private_step.CLIPPING_MODES["hooks"].wrap
    private = _private(nn.Linear(3, 2), "plain_hooks")
    assert wrapped == [C] and private.clipping is private_step.CLIPPING_MODES["plain_hooks"]


@pytest.mark.parametrize("mode", sorted(private_step.CLIPPING_MODES))
def test_each_entry_says_where_its_backward_pass_leaves_the_gradients(mode):
    """``clips_in_backward``: p.grad holds the clipped per-example sum (norm at most N * C); else
    every p.grad_sample holds the N unclipped per-example gradients, which the optimizer clips."""
    torch.manual_seed(0)
    private = _private(nn.Linear(3, 2), mode)
    x = 10 * torch.randn(N, 3)
    losses = (private.module(x) ** 2).sum(dim=1)
    private.clipping.backward(private.module, private.optimizer, losses)
    params = private.params
    if private.clipping.clips_in_backward:
        norm = float(torch.cat([p.grad.flatten() for p in params]).norm())
        assert 0 < norm <= N * C * (1 + 1e-4)
    else:
        assert all(p.grad_sample.shape == (N, *p.shape) for p in params)
        per_example = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1).norm(dim=1)
        assert bool((per_example > C).all())


@pytest.mark.parametrize("mode", sorted(private_step.CLIPPING_MODES))
def test_a_mode_that_refuses_tied_weights_refuses_them(mode):
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight  # one weight, two layers
    net = nn.Sequential(first, second)
    entry = private_step.CLIPPING_MODES[mode]
    # A mode clipping in its backward pass computes each example's norm from per-layer pieces, which
    # misjudges a weight two layers share (its gradient's norm is not the sum of the layers' parts).
    assert entry.refuses_tied_weights or not entry.clips_in_backward
    if entry.refuses_tied_weights:
        with pytest.raises(ConfigError, match=rf"field 'training.grad_sample_mode': '{mode}' cannot clip tied weights"):
            _private(net, mode)
    else:
        assert _private(net, mode).mode == mode
