"""Data stage: real DVC repositories, real Great Expectations, bad input named precisely."""

import hashlib
import hmac
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dpops.config import loading as data_config
from dpops.config.schema import DatasetConfig
from dpops.config.workspace import workspace
from dpops.data import prepare, validation
from dpops.data import source as data
from dpops.errors import ConfigError, DataValidationError
from tests import dvc_repo
from tests.dvc_repo import commit, dvc, make_repo, sh, tsv
from tests.helpers import steward_file

ROWS = [("1", "a fine film"), ("0", "dull and long"), ("1", "warm , funny"), ("0", "a mess")]


def _cfg(**over) -> DatasetConfig:
    base = dict(
        name="toy", files={"train": "data/train.tsv", "holdout": "data/holdout.tsv", "eval": "data/eval.tsv"},
        text_column="text", label_column="label", labels=["0", "1"], max_text_chars=50,
        privacy={"epsilon_cap": 5.0, "delta": 1e-3},
    )
    base.update(over)
    return DatasetConfig(**base)


@pytest.fixture
def repo(tmp_path):
    return make_repo(tmp_path / "repo", {"data/train.tsv": tsv(ROWS), "data/holdout.tsv": tsv(ROWS[:2]), "data/eval.tsv": tsv(ROWS[2:])})


def test_resolve_reads_by_revision_and_fingerprints_content(repo):
    v1 = data.resolve(_cfg(), repo=repo, rev="HEAD")
    commit(repo, {"data/train.tsv": tsv(ROWS + [("1", "new arrivals")])}, "data v2")
    v2 = data.resolve(_cfg(), repo=repo, rev="HEAD")
    old = data.resolve(_cfg(), repo=repo, rev="HEAD~1")
    assert (v1.n_records, v2.n_records) == (4, 5)
    assert old.fingerprint == v1.fingerprint != v2.fingerprint
    assert v1.version == f"hmac-sha256:{v1.fingerprint}"
    df = data.load_split(old, _cfg())
    assert len(df) == 4 and list(df.columns) == ["text", "label"]


def test_the_fingerprint_is_keyed_and_never_a_plain_hash(repo, tmp_path, monkeypatch):
    content = tsv(ROWS).encode()
    plain = {hashlib.sha256(content).hexdigest(), hashlib.md5(content).hexdigest()}
    ref = data.resolve(_cfg(), repo=repo)
    assert not any(h in json.dumps(asdict(ref)) + ref.version for h in plain)
    key_file = workspace().fingerprint_key_file
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes()) == 32
    assert ref.fingerprint == hmac.new(key_file.read_bytes(), content, "sha256").hexdigest()
    assert data.resolve(_cfg(), repo=repo).fingerprint == ref.fingerprint  # the key persists in the workspace

    monkeypatch.setenv("DPOPS_HOME", str(tmp_path / "another-workspace"))  # another key: another fingerprint
    other = data.resolve(_cfg(), repo=repo)
    assert other.fingerprint != ref.fingerprint
    with pytest.raises(DataValidationError, match="fingerprint mismatch.*DPOPS_FINGERPRINT_KEY"):
        data.load_split(ref, _cfg())  # resolved under another key: refused, not silently re-read

    key = "ab" * 32  # several machines share the key through the environment
    monkeypatch.setenv("DPOPS_FINGERPRINT_KEY", key)
    shared = data.resolve(_cfg(), repo=repo)
    assert shared.fingerprint == hmac.new(bytes.fromhex(key), content, "sha256").hexdigest()
    monkeypatch.setenv("DPOPS_HOME", str(tmp_path / "third-workspace"))
    assert data.resolve(_cfg(), repo=repo).fingerprint == shared.fingerprint
    assert not (tmp_path / "third-workspace").exists(), "with the variable set no key file is written"
    monkeypatch.setenv("DPOPS_FINGERPRINT_KEY", "not hex")
    with pytest.raises(ConfigError, match="DPOPS_FINGERPRINT_KEY must be 64 hex digits") as err:
        data.resolve(_cfg(), repo=repo)
    assert "not hex" not in str(err.value)


def test_a_fingerprint_key_file_readable_by_others_is_refused(repo):
    data.resolve(_cfg(), repo=repo)
    key_file = workspace().fingerprint_key_file
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match="fingerprint.key: the fingerprint key is readable by others"):
        data.resolve(_cfg(), repo=repo)


def test_validation_passes_on_good_data(repo):
    report = validation.validate(data.resolve(_cfg(), repo=repo), _cfg())
    assert report.success and report.n_records == 4 and not report.failures


@pytest.mark.parametrize(
    "content,match,row",
    [
        (tsv([("1", "fine"), ("1", "good"), ("7", "what")]), "expect_column_values_to_be_in_set\\(label\\)", 3),
        (tsv([("1", "fine"), ("0", "")]), "expect_column_values_to_not_be_null\\(text\\)", 2),
        (tsv([("1", "fine"), ("0", "x" * 51)]), "expect_column_value_lengths_to_be_between\\(text\\)", 2),
        (tsv([("1", "fine")], header=("label", "sentence")), "expect_column_to_exist\\(text\\)", None),
    ],
)
def test_validation_failures_name_expectation_and_column_not_rows_or_values(repo, content, match, row):
    commit(repo, {"data/train.tsv": content}, "bad data")
    with pytest.raises(DataValidationError, match=match) as err:
        validation.validate(data.resolve(_cfg(), repo=repo), _cfg())
    message = str(err.value)
    assert "data/train.tsv" in message
    assert "what" not in message and "xxxx" not in message
    assert not re.search(r"\brow\b", message), "a row number is row-level detail: steward-only"
    if row is None:  # nothing row-wise to report: no steward file
        assert "steward" not in message
        return
    path = steward_file(message)  # the first offending row, for the steward, in a private file
    assert path.parent == workspace().steward and path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert f"{match.replace(chr(92), '')}: first offending row {row}" in path.read_text()
    assert "what" not in path.read_text() and "xxxx" not in path.read_text()


def test_non_utf8_bytes_name_file_and_row(repo):
    commit(repo, {"data/train.tsv": tsv(ROWS).encode() + b"1\tcaf\xe9\n"}, "latin-1 row")
    with pytest.raises(DataValidationError, match=r"data/train.tsv: row 5: .*UTF-8"):
        data.resolve(_cfg(), repo=repo)


def test_missing_file_and_bad_revision(repo):
    with pytest.raises(DataValidationError, match="data/nope.tsv: file not found"):
        data.resolve(_cfg(files={"train": "data/nope.tsv", "holdout": "h", "eval": "e"}), repo=repo)
    with pytest.raises(DataValidationError, match="revision"):
        data.resolve(_cfg(), repo=repo, rev="no-such-rev")


def test_unknown_label_on_load_names_row_and_column(repo):
    commit(repo, {"data/train.tsv": tsv(ROWS + [("2", "odd")])}, "v")
    ref = data.resolve(_cfg(), repo=repo)
    with pytest.raises(DataValidationError, match="row 5: column 'label'"):
        data.load_split(ref, _cfg())


def test_load_refuses_content_that_changed_after_resolve(repo):
    ref = data.resolve(_cfg(), repo=repo)
    (repo / "data/train.tsv").write_text(tsv(ROWS[:3]))
    with pytest.raises(DataValidationError, match="content changed since it was resolved \\(fingerprint mismatch"):
        data.load_split(ref, _cfg())


# --------------------------------------------------------------------------- preparation (DVC stages)

RAW_CSV = (
    'label,body\r\n'
    '1,"a fine\r\nfilm, truly"\r\n'       # quoted newline and comma; CRLF endings
    '0,dull  and\tlong\r\n'
    '1,"a fine film, truly"\r\n'            # the first record once whitespace is normalized: dropped
    '0,torn between two labels\r\n'
    '1,torn between two labels\r\n'       # same text, other label: both copies dropped
    + "".join(f"{i % 2},record number {i}\r\n" for i in range(20))
)
RAW_EVAL = "label\tcontent\n1\tan evaluation sentence\n1\trecord number 3\n"  # the second repeats a train record


def _params(tmp_path, **over):
    p = {"files": {"train": {"path": "raw/train.csv", "format": "csv", "text_column": "body", "label_column": "label"},
                   "eval": {"path": "raw/dev.tsv", "format": "tsv", "text_column": "content", "label_column": "label"}},
         "holdout_fraction": 0.25, "split_key": "toy-key", "out_dir": "prepared/toy"}
    p.update(over)
    (tmp_path / "raw").mkdir(exist_ok=True)
    (tmp_path / "raw/train.csv").write_bytes(RAW_CSV.encode())
    (tmp_path / "raw/dev.tsv").write_text(RAW_EVAL)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prepare": {"toy": p}}))
    return tmp_path / "params.yaml"


def _read(path):
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)


def _expected_split(texts, p) -> dict[str, str]:
    """Each text's split as assign_split gives it for that text alone."""
    fractions = {k: p[k] for k in ("holdout_fraction", "eval_fraction") if k in p}
    return {t: prepare.assign_split(t, key=p["split_key"], **fractions) for t in texts}


def _splits(root) -> dict[str, str]:
    """text -> split name, over the prepared splits under ``root``."""
    return {t: s for s in ("train", "holdout", "eval") for t in _read(root / f"prepared/toy/{s}.tsv")["text"]}


def test_prepare_normalizes_dedupes_and_splits_by_key(tmp_path):
    out = prepare.prepare_from_params(_params(tmp_path), "toy")
    assert out["dedupe"] == {"records": 23, "dropped_repeats": 2, "dropped_label_conflicts": 2}
    splits = {s: _read(tmp_path / f"prepared/toy/{s}.tsv") for s in ("train", "holdout", "eval")}
    assert list(splits["train"].columns) == ["label", "text"]
    # 22 train-part records, each placed by its own keyed hash; the eval file's one new record in eval
    expected = _expected_split([t for s in ("train", "holdout") for t in splits[s]["text"]], {"holdout_fraction": 0.25,
                                                                                             "split_key": "toy-key"})
    assert len(expected) == 22 and sorted(set(expected.values())) == ["holdout", "train"]
    assert all(expected[t] == s for s in ("train", "holdout") for t in splits[s]["text"])
    assert list(splits["eval"]["text"]) == ["an evaluation sentence"]
    texts = [t for df in splits.values() for t in df["text"]]
    assert len(texts) == len(set(texts)) and "a fine film, truly" in texts and "dull and long" in texts
    assert not any("torn between" in t for t in texts)
    stats = json.loads((tmp_path / "prepared/toy/stats.json").read_text())
    assert stats["train"]["records"] == len(splits["train"]) and stats["dedupe"]["dropped_label_conflicts"] == 2
    first = (tmp_path / "prepared/toy/holdout.tsv").read_bytes()
    prepare.prepare_from_params(_params(tmp_path), "toy")
    assert (tmp_path / "prepared/toy/holdout.tsv").read_bytes() == first
    prepare.prepare_from_params(_params(tmp_path, split_key="another key"), "toy")  # a new key reshuffles
    assert (tmp_path / "prepared/toy/holdout.tsv").read_bytes() != first


def test_prepare_carves_eval_when_the_source_has_one_file(tmp_path):
    params = _params(tmp_path, eval_fraction=0.2)
    with pytest.raises(ConfigError, match=r"field 'prepare\.toy\.eval_fraction' must be given exactly when the raw data has no eval"):
        prepare.prepare_from_params(params, "toy")
    p = yaml.safe_load(params.read_text())
    del p["prepare"]["toy"]["files"]["eval"]
    params.write_text(yaml.safe_dump(p))
    out = prepare.prepare_from_params(params, "toy")
    got = _splits(tmp_path)
    assert len(got) == 22 and got == _expected_split(got, p["prepare"]["toy"])
    assert {s: out["split"][s]["records"] for s in ("train", "holdout", "eval")} == \
        {s: list(got.values()).count(s) for s in ("train", "holdout", "eval")}
    assert min(out["split"][s]["records"] for s in ("train", "holdout", "eval")) > 0


@pytest.mark.parametrize("over, match", [
    (dict(holdout_fraction=1.5), r"field 'prepare\.toy\.holdout_fraction' must be a number in \(0, 1\)\. Found 1\.5"),
    (dict(holdout_fraction="10%"), r"field 'prepare\.toy\.holdout_fraction' must be a number in \(0, 1\)"),
    (dict(split_key=""), r"field 'prepare\.toy\.split_key' must be a non-empty string"),
    (dict(holdout_fraction=1e-9), r"field 'prepare\.toy\.holdout_fraction': split 'holdout' would be empty"),
])
def test_prepare_names_bad_split_params(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        prepare.prepare_from_params(_params(tmp_path, **over), "toy")


#: A larger raw file for the stability tests: 300 records, no repeats.
MANY = [(str(i % 2), f"review number {i} of the stability set") for i in range(300)]


def _prepare_rows(tmp_path, rows, **over) -> dict[str, str]:
    """Prepare a one-file source (hold-out and eval carved) from ``rows``; text -> split."""
    root = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
    root.mkdir()
    params = _params(root, eval_fraction=0.2, **over)
    p = yaml.safe_load(params.read_text())
    del p["prepare"]["toy"]["files"]["eval"]
    params.write_text(yaml.safe_dump(p))
    (root / "raw/train.csv").write_text("label,body\n" + "".join(f"{label},{text}\n" for label, text in rows))
    prepare.prepare_from_params(params, "toy")
    return _splits(root)


@pytest.mark.parametrize("where", [0, 150, 300])
@pytest.mark.parametrize("change", ["add", "remove"])
def test_adding_or_removing_one_raw_record_moves_no_other_record(tmp_path, change, where):
    """A new data version with one record more or less: every other record keeps its split."""
    before = _prepare_rows(tmp_path, MANY)
    rows = list(MANY)
    if change == "add":
        rows.insert(where, ("1", "a newly arrived review"))
    else:
        del rows[min(where, len(rows) - 1)]
    after = _prepare_rows(tmp_path, rows)
    assert abs(len(after) - len(before)) == 1
    moved = [t for t in set(before) & set(after) if before[t] != after[t]]
    assert moved == [], f"{len(moved)} records changed split"
    assert {"train", "holdout", "eval"} == set(before.values())


def test_a_records_split_does_not_depend_on_the_rest_of_the_file(tmp_path):
    """Any subset of the records, in any order, puts each record where it goes alone."""
    full = _prepare_rows(tmp_path, MANY)
    subset = MANY[::3][::-1]
    part = _prepare_rows(tmp_path, subset)
    assert part == {t: full[t] for _, t in subset}
    assert full == _expected_split(full, {"holdout_fraction": 0.25, "eval_fraction": 0.2, "split_key": "toy-key"})


def test_a_label_conflict_removes_the_record_and_moves_no_other(tmp_path):
    """A new record with an existing text under another label: dedupe drops both copies, so the
    existing record leaves every split (it is not moved into hold-out or eval), nothing else moves."""
    before = _prepare_rows(tmp_path, MANY)
    label, text = MANY[42]
    after = _prepare_rows(tmp_path, MANY + [(str(1 - int(label)), text)])
    assert text in before and text not in after
    assert after == {t: s for t, s in before.items() if t != text}


def test_prepare_names_bad_raw_input(tmp_path):
    params = _params(tmp_path)
    (tmp_path / "raw/train.csv").write_bytes(b"label,body\n1,ok\n0,caf\xe9\n")
    with pytest.raises(DataValidationError, match=r"raw/train.csv: row 2: bytes are not valid UTF-8"):
        prepare.prepare_from_params(params, "toy")
    (tmp_path / "raw/train.csv").write_text("label,text\n1,ok\n")
    with pytest.raises(DataValidationError, match=r"raw/train.csv: the header has 2 field\(s\) and no column 'body' "
                                                  r"\(field 'files\.train\.text_column'\)"):
        prepare.prepare_from_params(params, "toy")


@pytest.mark.slow
def test_dvc_pipeline_reproduces_and_old_revisions_stay_readable(tmp_path, project_root, monkeypatch):
    """The project's stages (dvc.yaml) on a one-dataset repo: `dvc repro`, then a new version."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _params(repo, out_dir="data/prepared/toy")
    pipeline = yaml.safe_load((project_root / "dvc.yaml").read_text())
    pipeline["vars"] = [{"datasets": ["toy"]}]
    for stage in pipeline["stages"].values():  # raw files live in raw/; the stages' code in the project
        deps = [d.replace("data/raw/${item}", "raw") for d in stage["do"]["deps"]]
        stage["do"]["deps"] = [d for d in deps if not d.startswith("src/")]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline))
    (repo / ".gitignore").write_text("/data/interim/\n")
    sh(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    monkeypatch.setitem(dvc_repo.ENV, "PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cfg = _cfg(files={"train": "data/prepared/toy/train.tsv", "holdout": "data/prepared/toy/holdout.tsv",
                      "eval": "data/prepared/toy/eval.tsv"})
    dvc(repo, "repro", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "v1")
    v1 = data.resolve(cfg, repo=repo, rev="HEAD")
    with (repo / "raw/train.csv").open("a") as fh:  # data v2: new raw records at the end
        fh.write("".join(f"{i % 2},a later record {i}\r\n" for i in range(20)))
    dvc(repo, "repro", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "v2")
    v2 = data.resolve(cfg, repo=repo, rev="HEAD")
    assert v2.n_records > v1.n_records and v1.fingerprint != v2.fingerprint
    old = data.load_split(data.resolve(cfg, repo=repo, rev="HEAD~1"), cfg)
    assert data.resolve(cfg, repo=repo, rev="HEAD~1").fingerprint == v1.fingerprint and len(old) == v1.n_records
    assert set(old["text"]) <= set(data.load_split(v2, cfg)["text"])  # every v1 training record still trains


@pytest.mark.parametrize("name", ["sst2", "medical_abstracts", "twitter_financial_news"])
def test_project_datasets_pass_their_suites_with_delta_below_one_over_n(name, project_root):
    cfg = data_config.load_dataset_config(project_root / f"configs/datasets/{name}.yaml")
    if not (project_root / cfg.files.train).exists():
        pytest.fail(f"{cfg.files.train} is missing: run `dvc pull` and `dvc repro` first")
    ref = data.resolve(cfg, repo=project_root)
    assert validation.validate(ref, cfg).success
    assert cfg.privacy.delta * ref.n_units < 0.1
    stats = json.loads((project_root / Path(cfg.files.train).parent / "stats.json").read_text())
    assert stats["train"]["records"] == ref.n_records and set(stats["train"]["labels"]) == set(cfg.labels)
