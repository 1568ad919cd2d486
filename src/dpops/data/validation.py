"""Validating a resolved split: the Great Expectations suite a dataset config implies, boolean results only.

:func:`validate` runs the suite on the split :func:`dpops.data.source.resolve` named. Its error
names the file, the expectation and the column, never a row or a value; each failure's first
offending row goes to a file only the data steward reads.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from dpops.config.schema import BLOCK_NAME_PATTERN, DatasetConfig
from dpops.config.workspace import workspace
from dpops.data.source import DataRef, _columns, _first_row, _missing_columns, _parse, read_resolved
from dpops.errors import DataValidationError

#: row's user has records in (must be 1, or blocks do not compose in parallel). Never part of the file.
BLOCKS_PER_USER = "blocks_per_user"


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of the expectation suite: which checks failed, never which values."""

    success: bool
    n_records: int
    checks: list[tuple[str, Optional[str], bool]]  # (expectation, column, success)

    @property
    def failures(self) -> list[str]:
        return [f"{name}({col})" if col else name for name, col, ok in self.checks if not ok]


def build_suite(cfg: DatasetConfig):  # -> gx.ExpectationSuite
    """The Great Expectations suite a dataset config implies.

    Schema (the columns exist), no nulls or empty texts, labels in the configured set, text length
    within bounds, no duplicate records (a repeated record is one person counted twice). For a
    dataset partitioned into blocks: every record names a block (a short label, never free text),
    and for unit 'user' every user's records lie in exactly one block (otherwise parallel
    composition is invalid).

    No expectation bounds the records per user: a check that refuses the whole dataset because one
    user has too many records releases a fact about that one user. The bound is enforced at
    training instead, by a 1-stable transformation (:func:`dpops.train.user_level.bound_contributions`).
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name=f"dpops-{cfg.name}")
    suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=1))
    for col in _columns(cfg):
        suite.add_expectation(gxe.ExpectColumnToExist(column=col))
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=col))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=cfg.label_column, value_set=list(cfg.labels)))
    suite.add_expectation(
        gxe.ExpectColumnValueLengthsToBeBetween(
            column=cfg.text_column, min_value=cfg.min_text_chars, max_value=cfg.max_text_chars
        )
    )
    if cfg.unit == "user":
        suite.add_expectation(gxe.ExpectCompoundColumnsToBeUnique(column_list=[cfg.user_column, cfg.text_column]))
    else:
        suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column=cfg.text_column))
    if cfg.blocks is not None:
        suite.add_expectation(gxe.ExpectColumnValuesToMatchRegex(column=cfg.blocks.column, regex=BLOCK_NAME_PATTERN))
        if cfg.unit == "user":
            suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=BLOCKS_PER_USER, max_value=1))
    return suite


def _offending_rows(raw: pd.DataFrame, cfg: DatasetConfig) -> dict[str, Callable[[str], pd.Series]]:
    """For each row-wise expectation, which rows break it. GX's BOOLEAN_ONLY results carry no rows
    (any richer format copies the failing values), so the first bad row is found here to name it."""
    text_len = raw[cfg.text_column].str.len() if cfg.text_column in raw else None
    pair = [cfg.user_column, cfg.text_column]

    def between(col: str) -> pd.Series:  # BLOCKS_PER_USER: the first row whose block differs from its user's first block
        block = raw[cfg.blocks.column]
        return block.notna() & (block != block.groupby(raw[cfg.user_column], dropna=False).transform("first"))

    return {
        "expect_column_values_to_not_be_null": lambda col: raw[col].isna(),
        "expect_column_values_to_be_in_set": lambda col: raw[col].notna() & ~raw[col].isin(cfg.labels),
        "expect_column_value_lengths_to_be_between": lambda col: (text_len < cfg.min_text_chars) | (text_len > cfg.max_text_chars),
        "expect_column_values_to_be_unique": lambda col: raw[col].notna() & raw.duplicated(subset=[col]),
        "expect_compound_columns_to_be_unique": lambda col: (
            raw.duplicated(subset=pair) if set(pair) <= set(raw.columns) else pd.Series(False, index=raw.index)
        ),
        "expect_column_values_to_be_between": between,
        "expect_column_values_to_match_regex": lambda col: raw[col].notna() & ~raw[col].astype(str).str.contains(BLOCK_NAME_PATTERN),
    }


def _describe(failures: list[tuple[str, Optional[str]]], raw: pd.DataFrame, cfg: DatasetConfig) -> tuple[list[str], list[str]]:
    """What the error says of each failure (expectation, column, why: no row), and the steward-only
    lines (each failure's first offending row)."""
    rows = _offending_rows(raw, cfg)
    out, steward = [], []
    for name, col in failures:
        label = f"{name}({col})" if col else name
        if name in rows and (col is None or col in raw.columns):
            mask = rows[name](col).fillna(False).astype(bool)
            if mask.any():
                steward.append(f"{label}: first offending row {_first_row(mask)}")
        if col == BLOCKS_PER_USER and col in raw.columns:
            label += (f" (a user's records lie in more than one block of column {cfg.blocks.column!r}: blocks compose "
                      "in parallel only if every user is in exactly one)")
        elif cfg.blocks is not None and col == cfg.blocks.column and name == "expect_column_values_to_match_regex" \
                and col in raw.columns:
            label += " (block names are short labels: letters, digits, '_', '.', '-', at most 64 characters)"
        out.append(label)
    if any(name == "expect_column_to_exist" for name, _ in failures):
        out.append(_missing_columns([c for c in raw.columns if c != BLOCKS_PER_USER], cfg))
    if any(name == "expect_table_row_count_to_be_between" for name, _ in failures):
        out.append("the file has no records")
    return out, steward


def _steward_file(ref: DataRef, cfg: DatasetConfig, lines: list[str]) -> Path:
    """Write row-level detail of a failed validation where only the data steward reads it: a new
    file, mode 0600, under ``$DPOPS_HOME/steward/`` (mode 0700), never in an error or a log."""
    folder = workspace().steward
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / f"validation-{cfg.name}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}.txt"
    head = [f"dataset {cfg.name!r}, file {ref.path} at revision {ref.rev or 'working tree'} ({ref.version})",
            "rows count from 1 after the header", ""]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(head + lines) + "\n")
    return path


def validate(ref: DataRef, cfg: DatasetConfig) -> ValidationReport:
    """Run the dataset's expectation suite on the resolved training split.

    Results use GX's BOOLEAN_ONLY format, so no record value is copied into them.

    Raises:
        DataValidationError: any expectation failed; the message names the file, expectation and
            column, never a row or a value. Each failure's first offending row goes to a
            steward-only file (:func:`_steward_file`), whose path the message gives: Prefect
            persists the message in its logs, and a row number is a fact about one record.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    data = read_resolved(ref)
    raw = _parse(data, source=ref.path, delimiter=cfg.delimiter)
    if ref.n_records < len(raw):
        raw = raw.iloc[: ref.n_records]
    # Empty strings count as nulls: a text that is empty carries no record.
    raw = raw.replace({"": None})
    if cfg.unit == "user" and cfg.user_column in raw.columns and cfg.blocks is not None and cfg.blocks.column in raw.columns:
        raw[BLOCKS_PER_USER] = raw.groupby(cfg.user_column, dropna=False)[cfg.blocks.column].transform("nunique")

    context = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # progress bars are cosmetic
        pass
    asset = context.data_sources.add_pandas("dpops").add_dataframe_asset(cfg.name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": raw})
    result = batch.validate(build_suite(cfg), result_format="BOOLEAN_ONLY")
    checks = [
        (r.expectation_config.type, r.expectation_config.kwargs.get("column"), bool(r.success)) for r in result.results
    ]
    report = ValidationReport(success=bool(result.success), n_records=len(raw), checks=checks)
    if not report.success:
        failures = [(name, col) for name, col, ok in checks if not ok]
        said, steward = _describe(failures, raw, cfg)
        where = f" First offending rows, for the data steward only: {_steward_file(ref, cfg, steward)}." if steward else ""
        raise DataValidationError(
            f"{ref.path}: failed validation of dataset {cfg.name!r}: {'; '.join(said)}.{where} Nothing was charged or trained."
        )
    return report
