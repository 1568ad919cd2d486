"""Utility on held-out data (stage 7)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch

from dpops.models import hf as modeling


@torch.no_grad()
def per_example_loss(model_dir: str | Path, df: pd.DataFrame, *, batch_size: int = 256,
                     loaded: Optional[tuple[Any, Any, dict[str, Any]]] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Loss of every record of ``df`` (columns text, label) and its predicted class.

    The loss is the one training minimised (:func:`dpops.models.hf.per_example_loss`): cross-entropy
    for a classifier, mean next-token cross-entropy for a language model, whose predicted class is
    None. ``loaded``: the model of ``model_dir`` as :func:`dpops.models.hf.load` returned it, if the
    caller has it already (the pipeline loads it once for evaluation and the audit).
    """
    net, tokenizer, meta = loaded if loaded is not None else modeling.load(Path(model_dir))
    task, texts = meta["task"], df["text"].tolist()
    y = torch.tensor(df["label"].to_numpy(), dtype=torch.long)
    losses, predictions = [], []
    for i in range(0, len(texts), batch_size):
        inputs = modeling.model_inputs(*modeling.encode(tokenizer, texts[i : i + batch_size], meta["model"]["max_length"]))
        outputs = net(*inputs)
        losses.append(modeling.per_example_loss(task, outputs, y[i : i + batch_size], inputs[0], inputs[1]))
        if task == "classification":
            predictions.append(outputs.argmax(dim=-1))
    loss = torch.cat(losses) if losses else torch.zeros(0)
    if task != "classification":
        return loss, None
    return loss, torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def base_per_example_loss(model_dir: str | Path, df: pd.DataFrame, *, seed: int, batch_size: int = 256) -> torch.Tensor:
    """Loss of every record of ``df`` under the model the run started from: the pretrained weights
    with the trainable parts initialised as the trainer did (``torch.manual_seed(seed)``, then the
    same build), i.e. LoRA adapters at their zero update and the classifier head at its initial
    draw. The audit scores canaries as this loss minus the fine-tuned model's (calibrated scores:
    a canary that is hard for the base model is not mistaken for one training forgot)."""
    meta = json.loads((Path(model_dir) / modeling.META).read_text())
    meta.setdefault("task", "classification")
    meta.setdefault("method", "lora")
    model_cfg, lora = modeling.ModelConfig(**meta["model"]), modeling.LoraSettings(**meta["lora"])
    base = modeling.base_model_path(model_cfg)
    torch.manual_seed(seed)  # as training.train does before building the model
    net = modeling.build(meta["task"], meta["method"], base, n_labels=len(meta["labels"]), lora=lora).eval()
    tokenizer = modeling.load_tokenizer(base)
    y = torch.tensor(df["label"].to_numpy(), dtype=torch.long)
    texts, losses = df["text"].tolist(), []
    for i in range(0, len(texts), batch_size):
        inputs = modeling.model_inputs(*modeling.encode(tokenizer, texts[i : i + batch_size], meta["model"]["max_length"]))
        losses.append(modeling.per_example_loss(meta["task"], net(*inputs), y[i : i + batch_size], inputs[0], inputs[1]))
    return torch.cat(losses) if losses else torch.zeros(0)


def evaluate(model_dir: str | Path, eval_df: pd.DataFrame, *, batch_size: int = 256,
             loaded: Optional[tuple[Any, Any, dict[str, Any]]] = None) -> dict[str, float]:
    """Mean loss on ``eval_df``; for a classifier also accuracy and the majority-class baseline, for a
    language model perplexity."""
    if len(eval_df) == 0:
        raise ValueError("the evaluation split is empty")
    losses, pred = per_example_loss(model_dir, eval_df, batch_size=batch_size, loaded=loaded)
    metrics = {"eval_loss": float(losses.mean()), "eval_records": float(len(eval_df))}
    if pred is None:
        return {**metrics, "perplexity": float(torch.exp(losses.mean()))}
    y = torch.tensor(eval_df["label"].to_numpy())
    majority = float(eval_df["label"].value_counts(normalize=True).max())
    return {**metrics, "accuracy": float((pred == y).float().mean()), "majority_baseline": majority}
