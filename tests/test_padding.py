"""Padding cannot couple records: every batch is right-padded, so trimming it leaves each record's gradient alone.

Llama's tokenizer pads on the left. Trimming a left-padded batch to its longest row on the right
cuts other records' real tokens by an amount the longest record decides, so adding or removing
one record would change the others' clipped gradients: the clipped sum would then move by more
than the clipping bound C, which the accountant's sensitivity assumes.
"""

from __future__ import annotations

import pytest
import torch

from dpops.config.schema import LoraSettings
from dpops.errors import PrivacyError
from dpops.models import hf as modeling
from dpops.train import private_step
from tests.tiny_models import tiny_llama_left_padding

TEXTS = ["a fine film", "dull, slow and far too long for what it says", "yes", "the cast is superb", "no", "an odd thing"]
CLIP = 1.0


@pytest.fixture(scope="module")
def left_padding_llama(tmp_path_factory):
    return tiny_llama_left_padding(tmp_path_factory.mktemp("llama") / "left")


def test_llama_tokenizer_saved_to_pad_left_is_loaded_to_pad_right(left_padding_llama):
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(left_padding_llama), local_files_only=True)
    assert type(saved).__name__ == "LlamaTokenizer" and saved.padding_side == "left"  # the test's premise
    tokenizer = modeling.load_tokenizer(left_padding_llama)
    assert tokenizer.padding_side == "right"
    ids, mask = modeling.encode(tokenizer, TEXTS, 48)
    lengths = mask.sum(dim=1)
    assert len(set(lengths.tolist())) > 1  # texts of different lengths, so padding is exercised
    assert torch.equal(mask, (torch.arange(48) < lengths.unsqueeze(1)).long())  # ones, then zeros


@pytest.mark.parametrize("row", [[0, 0, 1, 1, 1], [1, 0, 1, 0, 0], [1, 1, 2, 0, 0]])
def test_mask_that_is_not_a_prefix_of_ones_is_refused_without_echoing_the_batch(row):
    mask = torch.tensor([[1, 1, 1, 0, 0], row])
    ids = torch.full((2, 5), 4242) * mask
    with pytest.raises(PrivacyError, match="not right-padded") as err:
        modeling.model_inputs(ids, mask)
    assert "4242" not in str(err.value) and str(row) not in str(err.value)


def test_right_padded_masks_pass_and_are_trimmed_to_the_longest_row():
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    ids, trimmed, _, positions = modeling.model_inputs(torch.arange(15).view(3, 5), mask)
    assert torch.equal(trimmed, mask[:, :3]) and ids.shape == (3, 3) and positions[0].tolist() == [0, 1, 2]


def _clipped_sum(private: private_step.PrivateModel, batch) -> torch.Tensor:
    """The trainer's clipped per-example gradient sum of ``batch`` (noise off, expected batch size 1)."""
    seen = []  # the optimizer's gradient just before the inner step: the clipped sum (+ zero noise) / 1
    private.optimizer.attach_step_hook(lambda opt: seen.append(torch.cat([p.grad.flatten() for p in opt.params])))
    private_step.noisy_step(private, batch, device=torch.device("cpu"), max_physical=None)
    assert len(seen) == 1
    return seen[0]


def test_one_record_changes_the_clipped_sum_by_its_own_clipped_gradient_only(left_padding_llama):
    """Add/remove neighbours: sum(batch) - clipped(x) == sum(batch without x), for each record x.

    Within float32 rounding (the trainer casts the losses to float32): 1.3e-7 here, where the old
    left-padded trim moved the sum by about C."""
    tokenizer = modeling.load_tokenizer(left_padding_llama)  # as the trainer loads it
    ids, mask = modeling.encode(tokenizer, TEXTS, 48)
    y = torch.zeros(len(TEXTS), dtype=torch.long)
    torch.manual_seed(0)
    net = modeling.build("causal_lm", "full", left_padding_llama, n_labels=2, lora=LoraSettings()).double()
    params = [p for p in net.parameters() if p.requires_grad]
    private = private_step.make_private(net, torch.optim.SGD(params, lr=0.0), task="causal_lm", mode="hooks",
                                    noise_multiplier=0.0, max_grad_norm=CLIP, expected_batch_size=1)
    whole = _clipped_sum(private, (ids, mask, y))
    # the longest record first: on a left-padded batch its removal moves every other record's trim
    order = torch.argsort(mask.sum(dim=1), descending=True, stable=True).tolist()
    for i in order:
        keep = [j for j in range(len(TEXTS)) if j != i]
        alone = _clipped_sum(private, (ids[i : i + 1], mask[i : i + 1], y[i : i + 1]))
        without = _clipped_sum(private, (ids[keep], mask[keep], y[keep]))
        assert float(alone.norm()) <= CLIP * (1 + 1e-9)
        gap = float((whole - alone - without).norm())
        assert gap < 1e-5 * CLIP, f"removing record {i} moved the others' clipped sum by {gap:.3g} (C = {CLIP})"
