"""Which clipping modes a model admits, checked from its config before anything is charged.

``training.grad_sample_mode`` picks how per-example gradients are clipped: one of the clipping
modes registered in :mod:`dpops.train.private_step` (Opacus's ``hooks`` and ``ghost``, dpops's
book-keeping ``bk``). Each mode's entry says whether it refuses tied weights and which layers it
can clip; the trainer checks the built model again once the charge runs; this is the same rule, earlier.
"""

from __future__ import annotations

from typing import Optional

from dpops.config.schema import LoraSettings, ModelConfig
from dpops.errors import ConfigError
from dpops.models import hf as modeling
from dpops.train import private_step


def check_grad_sample_mode(task: str, method: str, mode: str, model_cfg: ModelConfig, lora: Optional[LoraSettings] = None) -> None:
    """Refuse, from the model's config alone (no weights loaded), a mode the trainer would refuse
    only once the charge is running. Ghost clipping and book-keeping cannot clip tied weights, and
    full fine-tuning of a language model whose config ties its output layer to its input
    embeddings trains such a weight. Book-keeping also refuses a trainable layer it has no rule
    for: checked on the model's skeleton (built on the meta device, no weights). (The trainer
    checks the built model again.)

    Raises:
        ConfigError: naming the field (also for a mode no function is registered for).
    """
    clipping = private_step.clipping_mode(mode)
    if not clipping.refuses_tied_weights and clipping.check_layers is None:
        return
    modeling.offline()
    from transformers import AutoConfig

    base = modeling.base_model_path(model_cfg)
    if clipping.refuses_tied_weights and task == "causal_lm" and method == "full":
        config = AutoConfig.from_pretrained(str(base), local_files_only=True)
        if getattr(config, "tie_word_embeddings", False):
            raise ConfigError(
                f"field 'training.grad_sample_mode': {mode!r} cannot clip tied weights, and this model's config ties its "
                "output layer to its input embeddings (tie_word_embeddings); use 'hooks'"
            )
    if clipping.check_layers is not None:
        clipping.check_layers(modeling.build(task, method, base, n_labels=2, lora=lora or LoraSettings(), skeleton=True))
