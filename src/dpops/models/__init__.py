"""The models dpops fine-tunes: Hugging Face encoders and causal LMs with PEFT adapters.

Build, save, load, tokenise and score (:mod:`.hf`); offline only, weights from installed packages
or a local path.
"""

from dpops.models.hf import build, encode, load, load_tokenizer, per_example_loss, save

__all__ = [
    "build",
    "encode",
    "load",
    "load_tokenizer",
    "per_example_loss",
    "save",
]
