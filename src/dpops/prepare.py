"""Data preparation (DVC stages): raw files -> normalized, split, versioned outputs.

Outputs have two columns, ``label`` and ``text``, tab-separated with a header. The hold-out split
is carved from the raw training file by a seeded shuffle, so it comes from the same population as
the training records (the membership-inference audit needs that).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from dpops.errors import ConfigError, DataValidationError


def _read_raw(path: Path, *, text_column: str, label_column: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE, encoding="utf-8")
    except FileNotFoundError:
        raise DataValidationError(f"{path}: file not found (run `dvc pull`?)") from None
    except UnicodeDecodeError as exc:
        raise DataValidationError(f"{path}: bytes are not valid UTF-8 ({exc.reason} at offset {exc.start})") from None
    for col in (text_column, label_column):
        if col not in df.columns:
            raise DataValidationError(f"{path}: missing column {col!r}; found {list(df.columns)}")
    return pd.DataFrame({"label": df[label_column], "text": df[text_column]})


def _write(df: pd.DataFrame, path: Path) -> None:
    bad = df["text"].str.contains("[\t\r\n]", regex=True)
    if bad.any():
        raise DataValidationError(f"{path}: row {int(bad.to_numpy().argmax()) + 2}: text holds a tab or newline")
    path.parent.mkdir(parents=True, exist_ok=True)
    df[["label", "text"]].to_csv(path, sep="\t", index=False, quoting=csv.QUOTE_NONE, lineterminator="\n")


def prepare_splits(
    *, raw_train: Path, raw_eval: Path, out_dir: Path, train_text_column: str, eval_text_column: str,
    label_column: str, holdout_records: int, seed: int,
) -> dict[str, Any]:
    """Write ``train.tsv``, ``holdout.tsv`` and ``eval.tsv`` under ``out_dir``; return counts."""
    train = _read_raw(raw_train, text_column=train_text_column, label_column=label_column)
    evaluation = _read_raw(raw_eval, text_column=eval_text_column, label_column=label_column)
    if not 0 < holdout_records < len(train):
        raise ConfigError(f"params: holdout_records must be in (0, {len(train)}). Found {holdout_records}.")
    order = np.random.default_rng(seed).permutation(len(train))
    holdout = train.iloc[np.sort(order[:holdout_records])]
    kept = train.iloc[np.sort(order[holdout_records:])]
    _write(kept, out_dir / "train.tsv")
    _write(holdout, out_dir / "holdout.tsv")
    _write(evaluation, out_dir / "eval.tsv")
    return {"train": len(kept), "holdout": len(holdout), "eval": len(evaluation)}


def prepare_from_params(params_path: Path, dataset: str) -> dict[str, Any]:
    try:
        params = yaml.safe_load(Path(params_path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{params_path}: file not found") from None
    try:
        p = params["prepare"][dataset]
    except (KeyError, TypeError):
        raise ConfigError(f"{params_path}: no field 'prepare.{dataset}'") from None
    root = Path(params_path).resolve().parent
    return prepare_splits(
        raw_train=root / p["raw_train"], raw_eval=root / p["raw_eval"], out_dir=root / p["out_dir"],
        train_text_column=p["train_text_column"], eval_text_column=p["eval_text_column"],
        label_column=p["label_column"], holdout_records=int(p["holdout_records"]), seed=int(p["seed"]),
    )
