"""Private data: resolve a dataset version through DVC, load it, validate it.

Functions here return plain values. :func:`resolve` returns a :class:`DataRef` (paths, a keyed
fingerprint, counts, and for a dataset partitioned into blocks each block's name and count; never
records); only :func:`load_split` returns records, and it is called by the stages that need them
(validate, train, evaluate, audit), never by code that persists its results.

A data version is named by its **fingerprint**, HMAC-SHA256 of the file's bytes under the
workspace's secret key (:func:`dpops.settings.fingerprint_key`), never by a plain hash: anyone
holding all the records but one could test guesses of the last against a published sha256 or
DVC md5 offline. The plain hashes stay with the data steward (``dvc.lock``, ``.dvc`` pointers);
dpops neither computes nor releases them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from dpops.config.schema import BLOCK_NAME_PATTERN, DatasetConfig
from dpops.config.workspace import fingerprint_key, workspace
from dpops.errors import DataValidationError, describe_exception

TEXT = "text"
LABEL = "label"
USER = "user"  # unit 'user' only: who contributed the record


@dataclass(frozen=True)
class DataRef:
    """A reference to one version of one dataset: enough to re-read it and check it is the same."""

    dataset: str
    repo: str
    rev: Optional[str]
    path: str
    fingerprint: str  # HMAC-SHA256 of the file's bytes under the workspace key (hex); see fingerprint()
    n_records: int
    n_users: Optional[int] = None  # unit 'user' only: the number of privacy units
    #: Partitioned datasets only: each block's privacy units (records, or users for unit 'user'),
    #: blocks in the order they first appear in the file. None when the block column is missing or
    #: holds a value that is not a block name (validation then names the row).
    blocks: Optional[dict[str, int]] = None

    @property
    def n_units(self) -> int:
        """The n of the accountant, the delta < 1/n check and the ledger: users or records."""
        return self.n_users if self.n_users is not None else self.n_records

    @property
    def version(self) -> str:
        """The data version recorded in the ledger and MLflow: the keyed fingerprint, never a plain hash."""
        return f"hmac-sha256:{self.fingerprint}"


def fingerprint(data: bytes) -> str:
    """HMAC-SHA256 of ``data`` under the workspace's fingerprint key, hex.

    Names a data version (equal bytes, equal fingerprint, on every machine sharing the key) without
    letting anyone who lacks the key test a guess of the content.
    """
    return hmac.new(fingerprint_key(), data, hashlib.sha256).hexdigest()


def find_repo_root(start: str | Path) -> Path:
    """The nearest ancestor of ``start`` holding a ``.dvc`` directory."""
    p = Path(start).resolve()
    for candidate in [p, *p.parents]:
        if (candidate / ".dvc").is_dir():
            return candidate
    raise DataValidationError(f"{start}: not inside a DVC repository (no .dvc directory found above it)")


def read_bytes(repo: str | Path, path: str, rev: Optional[str] = None) -> bytes:
    """Bytes of ``path`` at git revision ``rev`` (None: the working tree), through DVC."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.api import DVCFileSystem

    try:
        fs = DVCFileSystem(str(repo), rev=rev)
    except Exception as exc:  # dvc raises several unrelated types for a bad rev
        raise DataValidationError(f"{repo}: cannot open revision {rev!r} ({describe_exception(exc)})") from None
    try:
        with fs.open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        where = f"at revision {rev}" if rev else "in the working tree"
        raise DataValidationError(
            f"{path}: file not found {where} of {repo} (run `dvc pull` and `dvc repro`?)"
        ) from None
    except Exception as exc:  # dvc's RevError, missing cache objects, ...
        raise DataValidationError(
            f"{path}: cannot read revision {rev!r} of {repo} ({describe_exception(exc)}; run `dvc pull`?)"
        ) from None
    return data


#: The most bytes :func:`read_header` reads looking for the end of the header line.
HEADER_MAX_BYTES = 1 << 20


def read_header(repo: str | Path, path: str, rev: Optional[str] = None) -> list[bytes]:
    """The first line of ``path`` at ``rev`` (at most :data:`HEADER_MAX_BYTES`), as raw bytes in a
    one-item list, or ``[]`` for an empty file; nothing after the first line is read.

    For checks before anything is charged: a header is a list of column names, but in a file
    without one it is a record, so callers compare it with the config and never repeat it.
    """
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.api import DVCFileSystem

    try:
        fs = DVCFileSystem(str(repo), rev=rev)
    except Exception as exc:  # dvc raises several unrelated types for a bad rev
        raise DataValidationError(f"{repo}: cannot open revision {rev!r} ({describe_exception(exc)})") from None
    head = b""
    try:
        with fs.open(path, "rb") as fh:
            while b"\n" not in head and len(head) < HEADER_MAX_BYTES:
                chunk = fh.read(64 * 1024)
                if not chunk:
                    break
                head += chunk
    except FileNotFoundError:
        where = f"at revision {rev}" if rev else "in the working tree"
        raise DataValidationError(f"{path}: file not found {where} of {repo} (run `dvc pull` and `dvc repro`?)") from None
    except IsADirectoryError:
        raise DataValidationError(f"{path}: is a directory, not a data file") from None
    except Exception as exc:  # dvc's RevError, missing cache objects, ...
        raise DataValidationError(
            f"{path}: cannot read revision {rev!r} of {repo} ({describe_exception(exc)}; run `dvc pull`?)"
        ) from None
    return [head.split(b"\n", 1)[0][:HEADER_MAX_BYTES]] if head else []


def check_split_headers(cfg: DatasetConfig, *, repo: str | Path, rev: Optional[str] = None, config_file: str | Path) -> None:
    """Refuse, before anything is charged, a hold-out or eval split that is missing or whose header
    lacks a configured column, and a training split that is missing. Reads only the first line of
    the hold-out and eval files and nothing of the training file (its records are validated later).

    Raises:
        DataValidationError: naming the file and the field of ``config_file`` that names it; never
            a header's content (in a file without a header line it is a record).
    """
    splits = {"train": cfg.files.train, "holdout": cfg.files.holdout, "eval": cfg.files.eval}
    for split, path in splits.items():
        field = f"(field 'files.{split}' of {config_file})"
        try:
            if split == "train":
                _check_exists(repo, path, rev)
                continue
            lines = read_header(repo, path, rev)
        except DataValidationError as exc:
            raise DataValidationError(f"{exc} {field}. Nothing was charged or trained.") from None
        if not lines:
            raise DataValidationError(f"{path}: the file is empty (not even a header) {field}. Nothing was charged or trained.")
        line = lines[0]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            if len(line) < HEADER_MAX_BYTES:
                raise DataValidationError(
                    f"{path}: row 0: bytes are not valid UTF-8 (offset {exc.start}) {field}. Nothing was charged or trained."
                ) from None
            text = line.decode("utf-8", errors="ignore")  # cut mid-character at the limit
        found = text.removesuffix("\r").split(cfg.delimiter)
        if any(c not in found for c in _columns(cfg, train=False)):
            raise DataValidationError(
                f"{path}: {_missing_columns(found, cfg, train=False)} {field}. Nothing was charged or trained."
            )


def _check_exists(repo: str | Path, path: str, rev: Optional[str]) -> None:
    """Refuse a file that ``read_bytes`` would not find; reads none of it."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.api import DVCFileSystem

    try:
        fs = DVCFileSystem(str(repo), rev=rev)
        found = fs.isfile(path)
    except Exception as exc:  # dvc raises several unrelated types for a bad rev
        raise DataValidationError(f"{repo}: cannot open revision {rev!r} ({describe_exception(exc)})") from None
    if not found:
        where = f"at revision {rev}" if rev else "in the working tree"
        raise DataValidationError(f"{path}: file not found {where} of {repo} (run `dvc pull` and `dvc repro`?)")


def _parse(data: bytes, *, source: str, delimiter: str) -> pd.DataFrame:
    """Strings of a delimited file with a header, every character literal (no quoting).

    Parsed here rather than by pandas, which silently turns an extra field into an index or drops
    it; a row whose field count differs from the header's is an error naming that row.
    Rows count from 1 after the header (row 0). Errors give counts, never a field: in a file
    without a header, the "header" is a private record.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        row = data[: exc.start].count(b"\n")
        raise DataValidationError(f"{source}: row {row}: bytes are not valid UTF-8 (offset {exc.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataValidationError(f"{source}: the file is empty (not even a header)")
    header, *rows = (line.removesuffix("\r").split(delimiter) for line in lines)
    for i, fields in enumerate(rows, start=1):
        if len(fields) != len(header):
            raise DataValidationError(
                f"{source}: row {i}: {len(fields)} field(s) separated by {delimiter!r}, but the header has {len(header)}; "
                "wrong delimiter?"
            )
    return pd.DataFrame(rows, columns=header, dtype=str)


def read_resolved(ref: DataRef) -> bytes:
    """The training split's bytes, refused unless their fingerprint is still the one resolve recorded."""
    data = read_bytes(ref.repo, ref.path, ref.rev)
    if not hmac.compare_digest(fingerprint(data), ref.fingerprint):
        raise DataValidationError(
            f"{ref.path}: content changed since it was resolved (fingerprint mismatch; or this process uses another "
            f"fingerprint key than the resolve stage's: see DPOPS_FINGERPRINT_KEY); refusing to use it"
        )
    return data


def _column_fields(cfg: DatasetConfig, *, train: bool = True) -> dict[str, str]:
    """The columns a split must have, each with the config field naming it: text and label, the
    user column for unit 'user', and in the training split of a partitioned dataset the block column."""
    fields = {cfg.text_column: "text_column", cfg.label_column: "label_column"}
    if cfg.unit == "user":
        fields.setdefault(cfg.user_column, "user_column")
    if train and cfg.blocks is not None:
        fields.setdefault(cfg.blocks.column, "blocks.column")
    return fields


def _columns(cfg: DatasetConfig, *, train: bool = True) -> list[str]:
    return list(_column_fields(cfg, train=train))


def _missing_columns(found: list[str], cfg: DatasetConfig, *, train: bool = True) -> str:
    """Which configured columns the header lacks, by config field, and how many fields it has.

    The header's own names are never repeated: in a file without a header they are a record.
    """
    missing = [f"{col!r} (field {field!r})" for col, field in _column_fields(cfg, train=train).items()
               if col not in found]
    return (f"the header has {len(found)} field(s) separated by {cfg.delimiter!r} and no column "
            f"{', '.join(missing)}; no header line, or wrong delimiter?")


def load_split(
    ref: DataRef, cfg: DatasetConfig, *, path: Optional[str] = None, max_records: Optional[int] = None,
    blocks: Optional[list[str]] = None,
) -> pd.DataFrame:
    """Load a split as a DataFrame with columns ``text`` and ``label`` (label as a class index),
    plus ``user`` (the user column's values) when the dataset's unit of privacy is 'user'.

    With ``path`` None the training split of ``ref`` is read, and its fingerprint must still equal
    the one recorded at resolve time. Other splits (eval, holdout) are read at the same revision.

    Args:
        blocks: training split of a partitioned dataset only: keep just the records of these
            blocks (the ones the run's charge names); None keeps every record.

    Raises:
        DataValidationError: unreadable file, changed content, missing column or unknown label.
    """
    if blocks is not None and (path is not None or cfg.blocks is None):
        raise ValueError("blocks= selects records of the training split of a partitioned dataset only")
    target = path or ref.path
    data = read_resolved(ref) if path is None else read_bytes(ref.repo, target, ref.rev)
    df = _parse(data, source=target, delimiter=cfg.delimiter)
    if any(c not in df.columns for c in _columns(cfg, train=path is None)):
        raise DataValidationError(f"{target}: {_missing_columns(list(df.columns), cfg, train=path is None)}")
    if max_records is not None:
        df = df.iloc[:max_records]
    index = {label: i for i, label in enumerate(cfg.labels)}
    labels = df[cfg.label_column].map(index)
    bad = labels.isna()
    if bad.any():
        raise DataValidationError(
            f"{target}: row {_first_row(bad)}: column {cfg.label_column!r} holds a label outside {cfg.labels}"
        )
    out = pd.DataFrame({TEXT: df[cfg.text_column].astype(str), LABEL: labels.astype(int)})
    if cfg.unit == "user":
        out[USER] = df[cfg.user_column].to_numpy()
    if blocks is not None:
        out = out[df[cfg.blocks.column].isin(set(blocks)).to_numpy()].reset_index(drop=True)
    return out


def _block_units(df: pd.DataFrame, cfg: DatasetConfig) -> Optional[dict[str, int]]:
    """Each block's privacy units (records, or distinct users), blocks in order of first appearance.

    None when the block column is missing, or any value is empty or not a block name: no value
    that could be free text leaves this function, and validation names the offending row.
    """
    col = cfg.blocks.column
    if col not in df.columns or df.empty or not df[col].str.contains(BLOCK_NAME_PATTERN).all():
        return None
    if cfg.unit == "user":
        if cfg.user_column not in df.columns:
            return None
        counts = df[cfg.user_column].replace({"": None}).groupby(df[col], sort=False).nunique()
    else:
        counts = df.groupby(col, sort=False).size()
    return {str(name): int(n) for name, n in counts.items()}


def resolve(cfg: DatasetConfig, *, repo: str | Path, rev: Optional[str] = None, max_records: Optional[int] = None) -> DataRef:
    """Resolve the training split of ``cfg`` at ``rev``: keyed fingerprint and record count, and
    for unit 'user' the number of users (the n of the accountant and the ledger).

    Args:
        max_records: count only the first N records (tests); training then reads exactly those.
    """
    data = read_bytes(repo, cfg.files.train, rev)
    df = _parse(data, source=cfg.files.train, delimiter=cfg.delimiter)
    if max_records is not None:
        df = df.iloc[:max_records]
    n_users = None
    if cfg.unit == "user" and cfg.user_column in df.columns:
        n_users = int(df[cfg.user_column].replace({"": None}).nunique())
    return DataRef(
        dataset=cfg.name, repo=str(Path(repo).resolve()), rev=rev, path=cfg.files.train,
        fingerprint=fingerprint(data), n_records=len(df), n_users=n_users,
        blocks=_block_units(df, cfg) if cfg.blocks is not None else None,
    )


def keyed_user_blocks(ref: DataRef, cfg: DatasetConfig, blocks: list[str]) -> dict[str, str]:
    """Keyed user id -> block, for the users of ``blocks`` in the resolved training file (unit
    'user', partitioned). The key is HMAC-SHA256 of the user id under the fingerprint key: the
    ledger's user-to-block map never holds a raw id. Rows past ``ref.n_records`` are not read."""
    df = _parse(read_resolved(ref), source=ref.path, delimiter=cfg.delimiter).iloc[:ref.n_records]
    df = df[df[cfg.blocks.column].isin(set(blocks))]
    key = fingerprint_key()
    out: dict[str, str] = {}
    for user, block in zip(df[cfg.user_column], df[cfg.blocks.column], strict=True):
        out.setdefault(hmac.new(key, f"user\x00{user}".encode("utf-8"), hashlib.sha256).hexdigest(), str(block))
    return out


# --------------------------------------------------------------------------- validation

#: Extra column the suite checks for unit 'user' on a partitioned dataset: how many blocks the
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


def _first_row(mask: pd.Series) -> int:
    """Row number (from 1, after the header) of the first True in ``mask``."""
    return int(mask.to_numpy().argmax()) + 1


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
