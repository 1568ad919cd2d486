"""Private data: resolve a dataset version through DVC, read it, load it.

Functions here return plain values. :func:`resolve` returns a :class:`DataRef` (paths, a keyed
fingerprint, counts, and for a dataset partitioned into blocks each block's name and count; never
records); only :func:`load_split` returns records, and it is called by the stages that need them
(validate, train, evaluate, audit), never by code that persists its results.

A data version is named by its **fingerprint**, HMAC-SHA256 of the file's bytes under the
workspace's secret key (:func:`dpops.config.workspace.fingerprint_key`), never by a plain hash: anyone
holding all the records but one could test guesses of the last against a published sha256 or
DVC md5 offline. The plain hashes stay with the data steward (``dvc.lock``, ``.dvc`` pointers);
dpops neither computes nor releases them. Validating a resolved split is :mod:`dpops.data.validation`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from dpops.config.schema import BLOCK_NAME_PATTERN, DatasetConfig
from dpops.config.workspace import fingerprint_key
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


def _first_row(mask: pd.Series) -> int:
    """Row number (from 1, after the header) of the first True in ``mask``."""
    return int(mask.to_numpy().argmax()) + 1


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
