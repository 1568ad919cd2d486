"""Bad input, one test each: a clear error naming the file and the row, column or field, never the
private text, and nothing charged, trained or registered.

Every case runs the real stages in the flow's order (resolve, validate, plan, reserve) on a real
DVC repository; one case also goes through `dpops run` (the Prefect flow).
"""

import logging
import os
import re
import subprocess
import sys

import pytest
import yaml

from dpops.data import prepare
from dpops.errors import EXIT_BAD_INPUT, MAX_MESSAGE_CHARS, DpopsError, exit_code
from dpops.ledger.store import Ledger
from dpops.pipeline import stages
from tests.dvc_repo import make_repo
from tests.helpers import policy_accepting_inconclusive

GOOD = ["1\ta fine and moving film", "0\tdull , long and flat", "1\twarm and funny throughout", "0\ta mess from start to end"]
SECRETS = ("fine and moving", "dull , long", "warm and funny", "mess from start", "xxxxxxxx", "caf")
#: The first record of a file without a header line: no 4 characters of it may reach a message.
SECRET = "Qz9#Wv7@Kp3!Xj5&Rb8%"
#: One line of 50 MB (no header, no newline): the message about it stays within the bound.
HUGE_LINE = "y" * 50_000_000


def _leaks(message: str, secret: str = SECRET) -> bool:
    """True when any 4 consecutive characters of ``secret`` appear in ``message``."""
    return any(secret[i:i + 4] in message for i in range(len(secret) - 3))


def _tsv(rows: list[str], header: str = "label\ttext") -> str:
    return "\n".join([header, *rows]) + "\n"


def _in_months(rows: list[str]) -> list[str]:
    """``rows`` with a block column in front: the first half arrived in 2026-01, the rest in 2026-02."""
    return [f"2026-0{1 + 2 * i // len(rows)}\t{r}" for i, r in enumerate(rows)]


#: A dataset partitioned into blocks by its column 'month'.
BLOCKS = {"blocks": {"column": "month"}}


def _setup(tmp_path, train: str | bytes, *, dataset: dict | None = None, dp: dict | None = None, holdout_header: str = "label\ttext",
           job_fields: dict | None = None, files: dict | None = None):
    """A DVC repo holding ``train`` plus good hold-out/eval splits (or ``files``, path -> content,
    in their place), and a job (with ``job_fields`` set) + dataset config."""
    users = holdout_header.startswith("user\t")
    split = [f"h{i}\t{r}" for i, r in enumerate(GOOD)] if users else GOOD
    repo = make_repo(tmp_path / "repo", {"data/train.tsv": train, "data/holdout.tsv": _tsv(split[:2], holdout_header),
                                         "data/eval.tsv": _tsv(split[2:], holdout_header), **(files or {})})
    ds = {"name": "toy", "files": {"train": "data/train.tsv", "holdout": "data/holdout.tsv", "eval": "data/eval.tsv"},
          "text_column": "text", "label_column": "label", "labels": ["0", "1"], "max_text_chars": 1000,
          "privacy": {"epsilon_cap": 5.0, "delta": 1e-3}}
    ds.update(dataset or {})
    (repo / "configs/datasets").mkdir(parents=True)
    (repo / "configs/jobs").mkdir()
    (repo / "configs/datasets/toy.yaml").write_text(yaml.safe_dump(ds))
    (repo / "configs/policy.yaml").write_text(yaml.safe_dump({"min_accuracy": 0.0}))
    job = repo / "configs/jobs/toy.yaml"
    job.write_text(yaml.safe_dump({"name": "toy", "dataset": "toy", "registered_model": "toy", "model": {"max_length": 8},
                                   "dp": {"target_epsilon": 1.0, "expected_batch_size": 2, "steps": 1, **(dp or {})},
                                   "audit": {"canaries": 10}, **(job_fields or {})}))
    return repo, job


def _until_reserve(repo, job, policy: str | None = None) -> None:
    ref = stages.resolve(str(job), str(repo))
    stages.validate(str(job), ref)
    plan = stages.plan(str(job), ref, policy_path=policy)
    stages.reserve(str(job), ref, plan)


def _assert_nothing_happened(home) -> None:
    if (home / "ledger.db").exists():
        assert Ledger(f"sqlite:///{home / 'ledger.db'}").datasets() == []
    assert not (home / "runs").exists()
    if (home / "mlflow.db").exists():
        import mlflow

        assert mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}").search_registered_models() == []


CASES = {
    "missing file": (dict(dataset={"files": {"train": "data/nope.tsv", "holdout": "data/holdout.tsv", "eval": "data/eval.tsv"}}),
                     r"data/nope\.tsv: file not found"),
    "wrong delimiter (comma file, tab config)": (dict(train=_tsv([r.replace("\t", ",") for r in GOOD], "label,text")),
                                                 r"data/train\.tsv: .*expect_column_to_exist\(text\).*the header has 1 field\(s\) "
                                                 r"separated by '\\t' and no column 'text' \(field 'text_column'\), 'label' "
                                                 r"\(field 'label_column'\)"),
    "wrong delimiter (tab file, comma config)": (dict(dataset={"delimiter": ","}),
                                                 r"data/train\.tsv: row 2: 2 field\(s\) separated by ','.*wrong delimiter"),
    "missing column": (dict(train=_tsv(GOOD, "label\tsentence")), r"data/train\.tsv: .*expect_column_to_exist\(text\)"),
    "null texts": (dict(train=_tsv(GOOD[:2] + ["0\t"] + GOOD[2:])),
                   r"data/train\.tsv: .*expect_column_values_to_not_be_null\(text\)"),
    "unknown labels": (dict(train=_tsv(GOOD[:1] + ["7\tan odd one"] + GOOD[1:])),
                       r"data/train\.tsv: .*expect_column_values_to_be_in_set\(label\)"),
    "empty dataset (header only)": (dict(train=_tsv([])), r"data/train\.tsv: .*expect_table_row_count_to_be_between.*no records"),
    "empty file": (dict(train=""), r"data/train\.tsv: the file is empty"),
    "one huge record": (dict(train=_tsv(GOOD[:1] + ["1\t" + "x" * 1_000_000] + GOOD[1:])),
                        r"data/train\.tsv: .*expect_column_value_lengths_to_be_between\(text\)"),
    "non-UTF-8 bytes": (dict(train=_tsv(GOOD[:2]).encode() + b"1\tcaf\xe9 au lait\n"), r"data/train\.tsv: row 3: bytes are not valid UTF-8"),
    "duplicate records": (dict(train=_tsv(GOOD + GOOD[1:2])), r"data/train\.tsv: .*expect_column_values_to_be_unique\(text\)"),
    "delta >= 1/n": (dict(dataset={"privacy": {"epsilon_cap": 5.0, "delta": 0.25}}),
                     r"configs/datasets/toy\.yaml: .*field 'privacy\.delta' = 0\.25 must be below 1/n = 0\.0714 \(n = 14"),
    "epsilon <= 0 (job)": (dict(dp={"target_epsilon": 0}), r"configs/jobs/toy\.yaml: field 'dp\.target_epsilon'"),
    "epsilon <= 0 (dataset cap)": (dict(dataset={"privacy": {"epsilon_cap": -1, "delta": 1e-3}}),
                                   r"configs/datasets/toy\.yaml: field 'privacy\.epsilon_cap'"),
    # datasets partitioned into blocks (field 'blocks')
    "block column missing": (dict(dataset=BLOCKS), r"data/train\.tsv: .*expect_column_to_exist\(month\).*the header has 2 field\(s\) "
                                                   r"separated by '\\t' and no column 'month' \(field 'blocks\.column'\)"),
    "empty block name": (dict(dataset=BLOCKS, train=_tsv(_in_months(GOOD[:2]) + ["\t0\tan odd one"], "month\tlabel\ttext")),
                         r"data/train\.tsv: .*expect_column_values_to_not_be_null\(month\)"),
    "block name that is free text": (dict(dataset=BLOCKS, train=_tsv(_in_months(GOOD[:3]) + ["xxxxxxxx xxxx\t0\tan odd one"],
                                                                     "month\tlabel\ttext")),
                                     r"data/train\.tsv: .*expect_column_values_to_match_regex\(month\) \(block names"),
    "a user in two blocks": (dict(dataset={**BLOCKS, "unit": "user", "user_column": "user", "contribution_bound": 2},
                                  train=_tsv(["u1\t2026-01\t" + GOOD[0], "u2\t2026-01\t" + GOOD[1], "u1\t2026-02\t" + GOOD[2],
                                              "u3\t2026-02\t" + GOOD[3]], "user\tmonth\tlabel\ttext"),
                                  holdout_header="user\tlabel\ttext"),
                             r"data/train\.tsv: .*expect_column_values_to_be_between\(blocks_per_user\) "
                             r"\(a user's records lie in more than one block of column 'month'"),
    "block column is the text column": (dict(dataset={"blocks": {"column": "text"}}),
                                        r"configs/datasets/toy\.yaml: .*'blocks\.column' must differ"),
    "dp.blocks on a dataset without blocks": (dict(dp={"blocks": "fresh"}),
                                              r"configs/jobs/toy\.yaml: field 'dp\.blocks' is 'fresh'.*configs/datasets/toy\.yaml has no field 'blocks'"),
    "delta >= 1/n of the fresh blocks": (dict(dataset={**BLOCKS, "privacy": {"epsilon_cap": 5.0, "delta": 0.08}},
                                              train=_tsv(_in_months(GOOD), "month\tlabel\ttext"), dp={"blocks": "fresh"}),
                                         r"configs/datasets/toy\.yaml: .*'privacy\.delta' = 0\.08 must be below 1/n = 0\.0714 \(n = 14"),
    # files without a header line: the first record is read as the header, and never echoed
    "no header line (first record a secret)": (dict(train="\n".join([f"1\t{SECRET}", *GOOD]) + "\n"),
                                               r"data/train\.tsv: .*expect_column_to_exist\(text\).*the header has 2 field\(s\) "
                                               r"separated by '\\t' and no column 'text' \(field 'text_column'\)"),
    "no header line, wrong delimiter": (dict(train="\n".join([f"1,{SECRET}", *GOOD]) + "\n", dataset={"delimiter": ","}),
                                        r"data/train\.tsv: row 1: 1 field\(s\) separated by ',', but the header has 2; wrong delimiter\?$"),
    "one line of 50 MB": (dict(train=HUGE_LINE), r"data/train\.tsv: .*the header has 1 field\(s\) .*no column 'text'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named_and_nothing_is_charged(case, tmp_path, workspace_env, caplog, recwarn):
    setup, match = CASES[case]
    repo, job = _setup(tmp_path, setup.get("train", _tsv(GOOD)), dataset=setup.get("dataset"), dp=setup.get("dp"),
                       holdout_header=setup.get("holdout_header", "label\ttext"))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DpopsError, match=match) as err:
        _until_reserve(repo, job)
    message = str(err.value)
    assert not any(s in message for s in SECRETS) and not _leaks(message) and "yyyy" not in message, message[:300]
    assert len(message) <= MAX_MESSAGE_CHARS
    emitted = [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn]  # every log line and warning
    assert not any(_leaks(line) or "yyyy" in line for line in emitted)
    _assert_nothing_happened(workspace_env)


def _model_without_tokenizer(tmp_path) -> str:
    """A real (tiny) model directory whose tokenizer files were left out."""
    from tests.tiny_models import tiny_bert

    path = tiny_bert(tmp_path / "no-tokenizer")
    for f in path.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("vocab.txt", "special_tokens_map.json"):
            f.unlink()
    return str(path)


#: Headerless split files: their first record stands where the header should be.
HEADERLESS = "\n".join([f"1\t{SECRET}", *GOOD]) + "\n"
FILES = {"train": "data/train.tsv", "holdout": "data/holdout.tsv", "eval": "data/eval.tsv"}

#: Mistakes in a config, a model directory or a hold-out/eval file, which the trainer or the eval
#: stage would otherwise meet only after the charge started: setup (``job_fields``, ``dataset``,
#: ``files``; ``job``: which path is given as the job; ``model``: a model directory to make), message.
PREFLIGHT_CASES = {
    "model.path missing": (dict(job_fields={"model": {"path": "models/nope", "max_length": 8}}),
                           r"configs/jobs/toy\.yaml: field 'model\.path' = 'models/nope': no such directory"),
    "LoRA target module the model lacks": (dict(job_fields={"lora": {"target_modules": ["query", "vlaue"]}}),
                                           r"configs/jobs/toy\.yaml: field 'lora\.target_modules' = \['query', 'vlaue'\]: "
                                           r".*no module named 'vlaue'"),
    "tokenizer missing": (dict(model="no tokenizer"), r"configs/jobs/toy\.yaml: field 'model\.path' = '.*no-tokenizer': no tokenizer"),
    "eval file missing": (dict(dataset={"files": {**FILES, "eval": "data/nope.tsv"}}),
                          r"data/nope\.tsv: file not found .*\(field 'files\.eval' of .*configs/datasets/toy\.yaml\)"),
    "holdout file missing": (dict(dataset={"files": {**FILES, "holdout": "data/nope.tsv"}}),
                             r"data/nope\.tsv: file not found .*\(field 'files\.holdout' of .*configs/datasets/toy\.yaml\)"),
    "eval file without the text column (no header line)": (
        dict(files={"data/eval.tsv": HEADERLESS}),
        r"data/eval\.tsv: the header has 2 field\(s\) separated by '\\t' and no column 'text' \(field 'text_column'\), "
        r"'label' \(field 'label_column'\).*\(field 'files\.eval' of .*configs/datasets/toy\.yaml\)"),
    "holdout with the wrong delimiter": (
        dict(files={"data/holdout.tsv": _tsv([r.replace("\t", ",") for r in GOOD], "label,text")}),
        r"data/holdout\.tsv: the header has 1 field\(s\) separated by '\\t' and no column 'text' \(field 'text_column'\), "
        r"'label' \(field 'label_column'\).*\(field 'files\.holdout' of .*configs/datasets/toy\.yaml\)"),
    "job file missing": (dict(job="configs/jobs/nope.yaml"), r"configs/jobs/nope\.yaml: (no such file|file not found)"),
    "job given as a directory": (dict(job="configs/jobs"), r"configs/jobs: is a directory; expected a job file"),
    "dataset config missing": (dict(job_fields={"dataset": "nope"}),
                               r"configs/jobs/toy\.yaml: field 'dataset' = 'nope': no dataset config .*configs/datasets/nope\.yaml"),
}


@pytest.mark.parametrize("case", list(PREFLIGHT_CASES))
def test_a_config_model_or_split_mistake_is_found_before_reserve(case, tmp_path, workspace_env, caplog):
    """Found by the preflight (what ``dpops run`` calls before Prefect starts), and again by the flow's
    own stages before reserve (plan calls it): the file and field named, no data text, nothing charged."""
    setup, match = PREFLIGHT_CASES[case]
    job_fields = dict(setup.get("job_fields") or {})
    if setup.get("model"):
        job_fields["model"] = {"path": _model_without_tokenizer(tmp_path), "max_length": 8}
    repo, job = _setup(tmp_path, _tsv(GOOD), dataset=setup.get("dataset"), job_fields=job_fields, files=setup.get("files"))
    if setup.get("job"):
        job = repo / setup["job"]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DpopsError, match=match) as before:
        stages.preflight(str(job))
    with pytest.raises(DpopsError, match=match) as during:  # the policy lets the good setup reach reserve (see below)
        _until_reserve(repo, job, policy_accepting_inconclusive(tmp_path))
    for message in (str(before.value), str(during.value)):
        assert not any(s in message for s in SECRETS) and not _leaks(message), message[:300]
    assert not any(_leaks(r.getMessage()) for r in caplog.records)
    assert exit_code(before.value) == exit_code(during.value) == EXIT_BAD_INPUT
    _assert_nothing_happened(workspace_env)


def test_the_good_setup_of_the_preflight_cases_reaches_reserve(tmp_path, workspace_env):
    """The control of the matrix above: without its mistake, the same setup passes every check and is charged."""
    repo, job = _setup(tmp_path, _tsv(GOOD))
    assert stages.preflight(str(job))["dataset"] == "toy"
    _until_reserve(repo, job, policy_accepting_inconclusive(tmp_path))
    assert Ledger(f"sqlite:///{workspace_env / 'ledger.db'}").datasets() != []


@pytest.mark.parametrize("split", ["holdout", "eval"])
def test_a_headerless_holdout_or_eval_file_is_not_echoed(split, tmp_path, workspace_env):
    """The other splits are read by later stages (load_split): their errors follow the same rule."""
    from dpops.config import loading as config
    from dpops.data import source as data

    repo, job = _setup(tmp_path, _tsv(GOOD))
    (repo / f"data/{split}.tsv").write_text("\n".join([f"1\t{SECRET}", *GOOD]) + "\n")
    cfg = config.load_dataset_config(repo / "configs/datasets/toy.yaml")
    ref = data.resolve(cfg, repo=repo)
    with pytest.raises(DpopsError, match=rf"data/{split}\.tsv: the header has 2 field\(s\) .*no column 'text' "
                                         r"\(field 'text_column'\)") as err:
        data.load_split(ref, cfg, path=f"data/{split}.tsv")
    assert not _leaks(str(err.value))


def _raw_params(tmp_path, train: str, fmt: str) -> object:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw/train.txt").write_text(train)
    p = {"files": {"train": {"path": "raw/train.txt", "format": fmt, "text_column": "text", "label_column": "label"}},
         "holdout_fraction": 0.2, "eval_fraction": 0.2, "split_key": "k", "out_dir": "prepared/toy"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prepare": {"toy": p}}))
    return tmp_path / "params.yaml"


RAW_CASES = {  # raw file, format, message
    "no header line (csv)": ("\n".join([f"1,{SECRET}", "0,dull and long"]) + "\n", "csv",
                             r"raw/train\.txt: the header has 2 field\(s\) and no column 'text' \(field 'files\.train\.text_column'\), "
                             r"'label' \(field 'files\.train\.label_column'\); no header line"),
    "no header line (tsv)": ("\n".join([f"1\t{SECRET}", "0\tdull and long"]) + "\n", "tsv", r"the header has 2 field\(s\) and no column"),
    "more fields than the header": ("\n".join([SECRET, f"1,{SECRET},{SECRET}"]) + "\n", "csv",
                                    r"raw/train\.txt: rows have more fields than the header \(1\); wrong format\?"),
    "unclosed quote": (f'label,text\n1,"{SECRET}\n', "csv", r"raw/train\.txt: cannot be parsed as csv \(ParserError\)"),
    "one line of 50 MB": (HUGE_LINE, "tsv", r"raw/train\.txt: cannot be parsed as tsv \(ParserError\)$"),  # csv's field limit
    "one quoted field of 50 MB": (f'label,text\n1,"{HUGE_LINE}"\n', "csv", r"raw/train\.txt: cannot be parsed as csv \(ParserError\)"),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_prepare_never_echoes_a_raw_file(case, tmp_path):
    """The DVC stages (``dpops prepare``): same rule as the run's stages, raw files included."""
    train, fmt, match = RAW_CASES[case]
    with pytest.raises(DpopsError, match=match) as err:
        prepare.prepare_from_params(_raw_params(tmp_path, train, fmt), "toy", "ingest")
    message = str(err.value)
    assert not _leaks(message) and "yyyy" not in message and len(message) <= MAX_MESSAGE_CHARS, message[:300]


def test_every_dpops_error_message_is_bounded():
    """However long the text handed to it, a dpops error's message stays within the bound and says
    how much was cut; the pickled copy a Prefect worker sends back is the same."""
    import pickle

    from dpops import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, DpopsError)]
    assert len(classes) >= 7
    for cls in classes:
        err = cls("a" * 10 + "z" * 10_000_000)
        message = str(err)
        cut = re.search(r" \[\.\.\. (\d+) characters cut\]$", message)
        assert len(message) <= MAX_MESSAGE_CHARS and message.startswith("a" * 10 + "z") and cut
        assert cut.start() + int(cut.group(1)) == 10_000_010  # characters kept + characters cut
        assert str(pickle.loads(pickle.dumps(err))) == str(err)
    assert str(DpopsError("short")) == "short"


def test_a_foreign_exception_enters_a_message_as_its_class_only(tmp_path):
    """DVC's and pandas' messages may quote a line or a content hash: only the class (and a line
    number) is kept. Checked on a real DVC error: a revision that does not exist."""
    from dpops.data import source as data
    from dpops.errors import describe_exception

    assert describe_exception(ValueError(f"Expected 2 fields in line 3, saw 3: {SECRET}")) == "ValueError at line 3"
    repo = make_repo(tmp_path / "repo", {"data/train.tsv": _tsv(GOOD)})
    with pytest.raises(DpopsError, match=r"cannot (open|read) revision 'no-such-rev-Qz9#'.* \(\w+(Error|Exception)\b") as err:
        data.read_bytes(repo, "data/train.tsv", rev="no-such-rev-Qz9#")
    assert str(err.value).count("no-such-rev") == 1, str(err.value)


@pytest.mark.slow
def test_dpops_run_stops_before_reserve_on_bad_data(tmp_path, workspace_env):
    repo, job = _setup(tmp_path, _tsv(GOOD[:1] + ["7\tan odd one"] + GOOD[1:]))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}  # 2 busy cores: 20 s is not enough
    # A fresh interpreter, as a user runs it: an in-process Prefect server started under a test
    # runner's captured streams keeps writing to them after they close.
    result = subprocess.run([sys.executable, "-m", "dpops.cli", "run", str(job)], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output  # bad input (README, "Exit codes")
    assert "expect_column_values_to_be_in_set(label)" in output and "row 2" not in output
    assert "odd one" not in output
    assert "Traceback" not in output  # Prefect's engines log a dpops error without its traceback
    _assert_nothing_happened(workspace_env)


def test_dpops_run_refuses_a_missing_model_path_before_prefect_starts(tmp_path, workspace_env):
    """`dpops run` runs the preflight before the flow: exit 2 (bad input) in seconds, one message
    naming the file and field, no traceback, Prefect never started, nothing charged."""
    import time

    repo, job = _setup(tmp_path, _tsv(GOOD), job_fields={"model": {"path": "models/nope", "max_length": 8}})
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "dpops.cli", "run", str(job)], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert re.search(r"dpops: .*configs/jobs/toy\.yaml: field 'model\.path' = 'models/nope': no such directory", result.stderr)
    assert "Traceback" not in output
    assert not (tmp_path / "prefect").exists()  # Prefect never started
    assert time.monotonic() - started < 120
    _assert_nothing_happened(workspace_env)
