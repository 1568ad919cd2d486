"""Private data: resolve a dataset version through DVC, load it, validate it.

Functions here return plain values. :func:`resolve` returns a :class:`DataRef` (paths, hashes,
counts, never records); only :func:`load_split` returns records, and it is called by the stages
that need them (validate, train, evaluate, audit), never by code that persists its results.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from dpops.config import DatasetConfig
from dpops.errors import DataValidationError

TEXT = "text"
LABEL = "label"


@dataclass(frozen=True)
class DataRef:
    """A reference to one version of one dataset: enough to re-read it and check it is the same."""

    dataset: str
    repo: str
    rev: Optional[str]
    path: str
    sha256: str
    dvc_md5: Optional[str]
    n_records: int

    @property
    def version(self) -> str:
        """The data version recorded in the ledger and MLflow."""
        return f"sha256:{self.sha256}"


def find_repo_root(start: str | Path) -> Path:
    """The nearest ancestor of ``start`` holding a ``.dvc`` directory."""
    p = Path(start).resolve()
    for candidate in [p, *p.parents]:
        if (candidate / ".dvc").is_dir():
            return candidate
    raise DataValidationError(f"{start}: not inside a DVC repository (no .dvc directory found above it)")


def read_bytes(repo: str | Path, path: str, rev: Optional[str] = None) -> tuple[bytes, Optional[str]]:
    """Bytes of ``path`` at git revision ``rev`` (None: the working tree), through DVC.

    Returns:
        ``(data, dvc_md5)``; the md5 is DVC's own hash of the output when DVC tracks the file.
    """
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.api import DVCFileSystem

    try:
        fs = DVCFileSystem(str(repo), rev=rev)
    except Exception as exc:  # dvc raises several unrelated types for a bad rev
        raise DataValidationError(f"{repo}: cannot open revision {rev!r}: {exc}") from None
    try:
        info = fs.info(path)
        with fs.open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        where = f"at revision {rev}" if rev else "in the working tree"
        raise DataValidationError(
            f"{path}: file not found {where} of {repo} (run `dvc pull` and `dvc repro`?)"
        ) from None
    except Exception as exc:  # dvc's RevError, missing cache objects, ...
        raise DataValidationError(f"{path}: cannot read revision {rev!r} of {repo}: {exc}") from None
    md5 = (info.get("dvc_info") or {}).get("md5") or info.get("md5")
    return data, md5


def _parse(data: bytes, *, source: str, delimiter: str) -> pd.DataFrame:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        row = data[: exc.start].count(b"\n")  # 0 = the header line
        raise DataValidationError(f"{source}: row {row}: bytes are not valid UTF-8 (offset {exc.start})") from None
    try:
        return pd.read_csv(
            io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False, na_values=[],
            quoting=csv.QUOTE_NONE, engine="python",
        )
    except pd.errors.ParserError as exc:
        raise DataValidationError(f"{source}: cannot be parsed with delimiter {delimiter!r}: {exc}") from None
    except pd.errors.EmptyDataError:
        raise DataValidationError(f"{source}: the file is empty") from None


def read_resolved(ref: DataRef) -> bytes:
    """The training split's bytes, refused unless they still hash to what resolve recorded."""
    data, _ = read_bytes(ref.repo, ref.path, ref.rev)
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise DataValidationError(f"{ref.path}: content changed since it was resolved (sha256 mismatch); refusing to use it")
    return data


def load_split(ref: DataRef, cfg: DatasetConfig, *, path: Optional[str] = None, max_records: Optional[int] = None) -> pd.DataFrame:
    """Load a split as a DataFrame with columns ``text`` and ``label`` (label as a class index).

    With ``path`` None the training split of ``ref`` is read, and its sha256 must still equal the
    one recorded at resolve time. Other splits (eval, holdout) are read at the same revision.

    Raises:
        DataValidationError: unreadable file, changed content, missing column or unknown label.
    """
    target = path or ref.path
    data = read_resolved(ref) if path is None else read_bytes(ref.repo, target, ref.rev)[0]
    df = _parse(data, source=target, delimiter=cfg.delimiter)
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in df.columns]
    if missing:
        raise DataValidationError(f"{target}: missing column(s) {missing}; found {list(df.columns)}")
    if max_records is not None:
        df = df.iloc[:max_records]
    index = {label: i for i, label in enumerate(cfg.labels)}
    labels = df[cfg.label_column].map(index)
    bad = labels.isna()
    if bad.any():
        row = int(bad.to_numpy().argmax()) + 2  # +1 header, +1 one-based
        raise DataValidationError(
            f"{target}: row {row}: column {cfg.label_column!r} holds a label outside {cfg.labels}"
        )
    return pd.DataFrame({TEXT: df[cfg.text_column].astype(str), LABEL: labels.astype(int)})


def resolve(cfg: DatasetConfig, *, repo: str | Path, rev: Optional[str] = None, max_records: Optional[int] = None) -> DataRef:
    """Resolve the training split of ``cfg`` at ``rev``: content hash and record count.

    Args:
        max_records: count only the first N records (tests); training then reads exactly those.
    """
    data, md5 = read_bytes(repo, cfg.files.train, rev)
    df = _parse(data, source=cfg.files.train, delimiter=cfg.delimiter)
    n = len(df) if max_records is None else min(len(df), max_records)
    return DataRef(
        dataset=cfg.name, repo=str(Path(repo).resolve()), rev=rev, path=cfg.files.train,
        sha256=hashlib.sha256(data).hexdigest(), dvc_md5=md5, n_records=n,
    )


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of the expectation suite: which checks failed, never which values."""

    success: bool
    n_records: int
    checks: list[tuple[str, Optional[str], bool]]  # (expectation, column, success)

    @property
    def failures(self) -> list[str]:
        return [f"{name}({col})" if col else name for name, col, ok in self.checks if not ok]


def build_suite(cfg: DatasetConfig, columns: list[str]):  # -> gx.ExpectationSuite
    """The Great Expectations suite a dataset config implies, over the raw file's columns."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name=f"dpops-{cfg.name}")
    suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=1))
    for col in (cfg.text_column, cfg.label_column):
        suite.add_expectation(gxe.ExpectColumnToExist(column=col))
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=col))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=cfg.label_column, value_set=list(cfg.labels)))
    suite.add_expectation(
        gxe.ExpectColumnValueLengthsToBeBetween(
            column=cfg.text_column, min_value=cfg.min_text_chars, max_value=cfg.max_text_chars
        )
    )
    return suite


def validate(ref: DataRef, cfg: DatasetConfig) -> ValidationReport:
    """Run the dataset's expectation suite on the resolved training split.

    Results use GX's BOOLEAN_ONLY format, so no record value is copied into them.

    Raises:
        DataValidationError: any expectation failed; the message names expectation and column.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    data = read_resolved(ref)
    raw = _parse(data, source=ref.path, delimiter=cfg.delimiter)
    if ref.n_records < len(raw):
        raw = raw.iloc[: ref.n_records]
    # Empty strings count as nulls: a text that is empty carries no record.
    raw = raw.replace({"": None})

    context = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # progress bars are cosmetic
        pass
    asset = context.data_sources.add_pandas("dpops").add_dataframe_asset(cfg.name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": raw})
    result = batch.validate(build_suite(cfg, list(raw.columns)), result_format="BOOLEAN_ONLY")
    checks = [
        (r.expectation_config.type, r.expectation_config.kwargs.get("column"), bool(r.success)) for r in result.results
    ]
    report = ValidationReport(success=bool(result.success), n_records=len(raw), checks=checks)
    if not report.success:
        raise DataValidationError(
            f"{ref.path}: failed validation of dataset {cfg.name!r}: {', '.join(report.failures)}. "
            "Nothing was charged or trained."
        )
    return report
