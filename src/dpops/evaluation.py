"""Utility on held-out data (stage 7)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from dpops import model as modeling


def per_example_loss(model_dir: str | Path, df: pd.DataFrame, *, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy loss and predicted class of every record of ``df`` (columns text, label)."""
    net, tokenizer, meta = modeling.load(Path(model_dir))
    logits = modeling.predict_logits(
        net, tokenizer, df["text"].tolist(), max_length=meta["model"]["max_length"], batch_size=batch_size
    )
    y = torch.tensor(df["label"].to_numpy(), dtype=torch.long)
    losses = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    return losses, logits.argmax(dim=-1)


def evaluate(model_dir: str | Path, eval_df: pd.DataFrame, *, batch_size: int = 256) -> dict[str, float]:
    """Accuracy and mean loss on ``eval_df``; also the majority-class baseline for context."""
    if len(eval_df) == 0:
        raise ValueError("the evaluation split is empty")
    losses, pred = per_example_loss(model_dir, eval_df, batch_size=batch_size)
    y = torch.tensor(eval_df["label"].to_numpy())
    majority = float(eval_df["label"].value_counts(normalize=True).max())
    return {
        "accuracy": float((pred == y).float().mean()),
        "eval_loss": float(losses.mean()),
        "eval_records": float(len(eval_df)),
        "majority_baseline": majority,
    }
