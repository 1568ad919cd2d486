"""Data preparation (the DVC stages): raw files -> one versioned ``train/holdout/eval`` split.

Four steps, each a stage of ``dvc.yaml`` run once per dataset (``dpops prepare DATASET --step S``)
with the dataset's parameters from ``params.yaml`` (``prepare.<dataset>``):

1. ``ingest``: read every raw file in its own format (CSV with quoting, or TSV), strictly as UTF-8,
   into one JSON-lines file; a record keeps the raw file's columns and which part it came from.
2. ``normalize``: pick the text and label columns (raw files name them differently), collapse
   whitespace (tabs and newlines included), Unicode NFC.
3. ``dedupe``: one record per text. A text repeated with the same label is kept once; a text
   repeated with different labels is dropped entirely (its label is ambiguous). Under record-level
   DP a repeated record is one person counted twice, so duplicates would weaken the guarantee.
4. ``split``: each record of the ``train`` part goes to the hold-out (the audit's non-members,
   from the same population), to the evaluation split when there is no ``eval`` part, or to
   training, by a keyed hash of its own text (:func:`assign_split`). A record's split depends on
   nothing but its text and the dataset's ``split_key``, so adding or removing records never moves
   another record between splits, and a record keeps its split across data versions.

Outputs are tab-separated with a header ``label<TAB>text``; ``stats.json`` beside them holds counts
only (never a record). Intermediate files live under ``data/interim/`` and are not cached by DVC.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import re
import unicodedata
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd
import yaml

from dpops.errors import ConfigError, DataValidationError, describe_exception

STEPS = ("ingest", "normalize", "dedupe", "split")
PARTS = ("train", "eval")
_SPACE = re.compile(r"\s+")


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataValidationError(f"{path}: file not found (run `dvc pull`?)") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        row = data[: exc.start].count(b"\n")  # 0 = the header line
        raise DataValidationError(f"{path}: row {row}: bytes are not valid UTF-8 (offset {exc.start})") from None


def read_raw(path: Path, *, fmt: str, columns: dict[str, str]) -> pd.DataFrame:
    """One raw file as strings. ``fmt`` 'csv' honours quotes (texts may hold commas and newlines);
    'tsv' reads every character literally, as GLUE writes it. ``columns`` maps the params field
    naming a column (``text_column``, ``label_column``) to the column's name.

    Errors name the file, a line number and params fields, never the file's content: in a raw file
    without a header, the header pandas reads is a private record.
    """
    text = _read_text(path)
    if fmt not in ("csv", "tsv"):
        raise ConfigError(f"params: field 'format' of {path} must be 'csv' or 'tsv'. Found {fmt!r}.")
    quoting = csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE
    try:
        df = pd.read_csv(io.StringIO(text), sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False,
                         na_values=[], quoting=quoting, engine="python")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as exc:
        raise DataValidationError(f"{path}: cannot be parsed as {fmt} ({describe_exception(exc)})") from None
    if not isinstance(df.index, pd.RangeIndex):  # pandas turns surplus leading fields into an index
        raise DataValidationError(f"{path}: rows have more fields than the header ({len(df.columns)}); wrong format?")
    missing = [f"{column!r} (field {field!r})" for field, column in columns.items() if column not in df.columns]
    if missing:
        raise DataValidationError(f"{path}: the header has {len(df.columns)} field(s) and no column {', '.join(missing)}; "
                                  "no header line, or wrong format?")
    return df


# --------------------------------------------------------------------------- the four steps


def ingest(p: dict[str, Any], root: Path, out: Path) -> dict[str, int]:
    """Raw files -> ``ingested.jsonl``: one JSON object per record, ``part`` plus the raw columns."""
    counts = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for part, spec in _parts(p):
            df = read_raw(root / spec["path"], fmt=spec["format"],
                          columns={f"files.{part}.{k}": spec[k] for k in ("text_column", "label_column")})
            for record in df.to_dict(orient="records"):
                fh.write(json.dumps({"part": part, **record}, ensure_ascii=False) + "\n")
            counts[part] = len(df)
    return counts


def normalize_text(text: str) -> str:
    """NFC, whitespace runs (tabs, newlines) to one space, trimmed.

    >>> normalize_text(" a\\tfine\\r\\n film ")
    'a fine film'
    """
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def normalize(p: dict[str, Any], src: Path, out: Path) -> dict[str, int]:
    """``ingested.jsonl`` -> ``normalized.tsv`` with columns ``part``, ``label``, ``text``."""
    specs = dict(_parts(p))
    rows = []
    with src.open(encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            spec = specs[record["part"]]
            rows.append((record["part"], record[spec["label_column"]].strip(), normalize_text(record[spec["text_column"]])))
    df = pd.DataFrame(rows, columns=["part", "label", "text"])
    _write(df, out, ["part", "label", "text"])
    return {"records": len(df)}


def dedupe(src: Path, out: Path, stats: Path) -> dict[str, int]:
    """``normalized.tsv`` -> ``deduplicated.tsv``: one record per text, across all parts.

    The first occurrence wins (train before eval), so a text never sits in two splits. A text under
    two labels is dropped with every copy: a new record that conflicts with an existing one's label
    removes the existing one from every split (it never moves it into another). The counts of
    dropped records go to ``stats`` for the split step to publish.
    """
    df = _read_tsv(src)
    labels_per_text = df.groupby("text")["label"].transform("nunique")
    conflicting = labels_per_text > 1
    kept = df[~conflicting]
    repeated = kept.duplicated(subset=["text"], keep="first")
    kept = kept[~repeated]
    _write(kept, out, ["part", "label", "text"])
    counts = {"records": len(kept), "dropped_repeats": int(repeated.sum()), "dropped_label_conflicts": int(conflicting.sum())}
    stats.write_text(json.dumps(counts) + "\n")
    return counts


def assign_split(text: str, *, key: str, holdout_fraction: float, eval_fraction: float = 0.0) -> str:
    """The split of one ``train``-part record: 'holdout', 'eval' or 'train'.

    ``u = HMAC-SHA256(key, text)`` read as a number in [0, 1): hold-out if ``u < holdout_fraction``,
    eval if ``u < holdout_fraction + eval_fraction``, else train. After deduplication a record's
    normalized text is unique, so the text is its identity; the result depends on nothing else in
    the file, hence is the same in every data version that holds the record. Fractions, not
    counts: a count depends on n, and a changed n would move records.

    >>> assign_split("a fine film", key="k", holdout_fraction=0.5) in ("holdout", "train")
    True
    """
    digest = hmac.new(key.encode("utf-8"), text.encode("utf-8"), hashlib.sha256).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < holdout_fraction:
        return "holdout"
    return "eval" if u < holdout_fraction + eval_fraction else "train"


def split(p: dict[str, Any], src: Path, dedupe_stats: Path, out_dir: Path, *, dataset: str = "<dataset>") -> dict[str, Any]:
    """``deduplicated.tsv`` -> ``train.tsv``, ``holdout.tsv``, ``eval.tsv``, each ``train``-part
    record placed by :func:`assign_split`; ``stats.json``: records and labels per split, and what
    deduplication dropped. Records keep their order in the file within each split."""
    def field(name: str) -> str:
        return f"params: field 'prepare.{dataset}.{name}'"

    df = _read_tsv(src)
    train = df[df["part"] == "train"]
    has_eval = bool((df["part"] == "eval").any())
    if has_eval == ("eval_fraction" in p):
        raise ConfigError(f"{field('eval_fraction')} must be given exactly when the raw data has no eval file")
    key = p["split_key"]
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{field('split_key')} must be a non-empty string")
    fractions = {"holdout_fraction": p["holdout_fraction"], "eval_fraction": p.get("eval_fraction", 0.0)}
    for name in (n for n in fractions if n in p):
        value = p[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ConfigError(f"{field(name)} must be a number in (0, 1). Found {value!r}.")
    if sum(fractions.values()) >= 1:
        raise ConfigError(f"{field('holdout_fraction')} + 'eval_fraction' must be below 1. Found {sum(fractions.values()):g}.")
    where = train["text"].map(lambda t: assign_split(t, key=key, **fractions))
    splits = {
        "holdout": train[where == "holdout"],
        "eval": train[where == "eval"] if not has_eval else df[df["part"] == "eval"],
        "train": train[where == "train"],
    }
    for name, part in splits.items():
        if part.empty:
            hint = "eval_fraction" if name == "eval" else "holdout_fraction"
            raise ConfigError(f"{field(hint)}: split {name!r} would be empty ({len(train)} records in the train part)")
    stats: dict[str, Any] = {"dedupe": json.loads(dedupe_stats.read_text())}
    for name, part in splits.items():
        _write(part, out_dir / f"{name}.tsv", ["label", "text"])
        stats[name] = {"records": len(part), "labels": {str(k): int(v) for k, v in sorted(part["label"].value_counts().items())}}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


# --------------------------------------------------------------------------- driving the steps


def interim_dir(root: Path, dataset: str) -> Path:
    return root / "data" / "interim" / dataset


def run_step(step: str, p: dict[str, Any], root: Path, dataset: str) -> dict[str, Any]:
    """Run one step with its fixed inputs and outputs (the paths ``dvc.yaml`` declares)."""
    interim = interim_dir(root, dataset)
    out_dir = root / p["out_dir"]
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "ingest": lambda: ingest(p, root, interim / "ingested.jsonl"),
        "normalize": lambda: normalize(p, interim / "ingested.jsonl", interim / "normalized.tsv"),
        "dedupe": lambda: dedupe(interim / "normalized.tsv", interim / "deduplicated.tsv", interim / "dedupe.json"),
        "split": lambda: split(p, interim / "deduplicated.tsv", interim / "dedupe.json", out_dir, dataset=dataset),
    }
    if step not in steps:
        raise ConfigError(f"step must be one of {list(STEPS)}. Found {step!r}.")
    return steps[step]()


def prepare_from_params(params_path: Path, dataset: str, step: Optional[str] = None) -> dict[str, Any]:
    """Run ``step`` (None: every step in order) for ``dataset`` as ``params.yaml`` configures it."""
    p = dataset_params(params_path, dataset)
    root = Path(params_path).resolve().parent
    return {s: run_step(s, p, root, dataset) for s in ([step] if step else STEPS)}


def dataset_params(params_path: Path, dataset: str) -> dict[str, Any]:
    try:
        params = yaml.safe_load(Path(params_path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{params_path}: file not found") from None
    try:
        p = params["prepare"][dataset]
    except (KeyError, TypeError):
        raise ConfigError(f"{params_path}: no field 'prepare.{dataset}'") from None
    for key in ("files", "holdout_fraction", "split_key", "out_dir"):
        if key not in p:
            raise ConfigError(f"{params_path}: field 'prepare.{dataset}.{key}' is missing")
    return p


def _parts(p: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    files = p["files"]
    unknown = set(files) - set(PARTS)
    if unknown or "train" not in files:
        raise ConfigError(f"params: field 'files' needs 'train' (and optionally 'eval'), nothing else. Found {sorted(files)}.")
    return [(part, files[part]) for part in PARTS if part in files]


def _read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[], quoting=csv.QUOTE_NONE)


def _write(df: pd.DataFrame, path: Path, columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df[columns].to_csv(path, sep="\t", index=False, quoting=csv.QUOTE_NONE, lineterminator="\n")
