"""One function per stage of a private fine-tune, taking and returning plain values.

Prefect tasks (``tasks/``) and the CLI call these. Every function receives the job file's path
and references (dicts of paths, keyed fingerprints, counts, ids) and returns references: private records are
read inside a stage and never returned, so an orchestrator cannot persist them.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from dpops.assess import audit as auditing
from dpops.assess import audit_report, bounds, canaries, evaluation
from dpops.config import schema as cfgmod
from dpops.config.loading import blocks_mode, configs_root, load_policy
from dpops.config.policy import PolicyConfig
from dpops.config.spec import RunSpec
from dpops.config.workspace import Workspace, workspace
from dpops.data import source as datamod
from dpops.data import validation
from dpops.errors import ConfigError, DataValidationError, PrivacyError
from dpops.ledger.states import RESERVED, Charge, DatasetBudget
from dpops.ledger.store import Ledger
from dpops.models import hf as modeling
from dpops.pipeline import context
from dpops.pipeline import planning as privacy
from dpops.privacy import filters
from dpops.privacy.accounting import SubsampledGaussian
from dpops.privacy.plan import Plan, charge_differences, filter_from_dict
from dpops.registry import tracking
from dpops.train import clipping
from dpops.train import distributed as launch
from dpops.train import trainer as training
from dpops.train import user_level as users


def _spec(job_path: str) -> RunSpec:
    """The run's configs, loaded and checked (the clipping mode against the model's config too)."""
    spec = RunSpec.load(job_path)
    job = spec.job
    try:
        clipping.check_grad_sample_mode(job.task, job.method, job.grad_sample_mode, job.model, job.lora)
    except ConfigError as exc:
        raise ConfigError(f"{job_path}: {exc}. Nothing was charged or trained.") from None
    return spec


def _load(job_path: str) -> tuple[cfgmod.JobConfig, cfgmod.DatasetConfig]:
    spec = _spec(job_path)
    return spec.job, spec.dataset


def _check_config_file(path: str, what: str) -> None:
    """Refuse a config path that is not a file (missing, or a directory) with its name, not an OSError."""
    p = Path(path)
    if not p.is_file():
        why = "is a directory" if p.is_dir() else "no such file"
        raise ConfigError(f"{path}: {why}; expected a {what} (YAML). Nothing was charged or trained.")


def preflight(job_path: str, *, policy_path: Optional[str] = None, repo: Optional[str] = None) -> dict[str, Any]:
    """Check, before anything is reserved, what a run would otherwise find only after its charge
    starts, when the charge is already spent: the job, dataset and policy configs load; the model
    directory (``model.path`` or ``model.package``) exists, holds a model and tokenizer transformers
    loads, and has every LoRA target module the job names (:func:`dpops.models.hf.check_model`, on a
    skeleton: no weights read); the training split exists and the hold-out and eval splits exist
    with the configured columns in their header line (:func:`dpops.data.source.check_split_headers`).

    Reads no training record and charges nothing, so ``dpops run`` calls it before Prefect starts
    and :func:`plan` calls it again before its plan can be reserved. Data files are looked up at
    the job's ``data_rev`` in ``repo`` (default: the job file's DVC repository). Returns what was checked (names only).

    Raises:
        ConfigError: naming the config file and field.
        DataValidationError: naming the data file and the dataset config's field; never its content.
    """
    job, ds = _load(job_path)
    if policy_path is not None:
        _check_config_file(policy_path, "policy file")
        load_policy(policy_path)
    try:
        modeling.check_model(job.task, job.method, job.model, job.lora, n_labels=len(ds.labels))
    except ConfigError as exc:
        raise ConfigError(f"{job_path}: {exc}. Nothing was charged or trained.") from None
    root = datamod.find_repo_root(repo or Path(job_path).resolve().parent)
    datamod.check_split_headers(ds, repo=root, rev=job.data_rev,
                                config_file=_dataset_file(job_path, ds))
    return {"job": job.name, "dataset": ds.name, "model": job.model.path or job.model.package, "method": job.method}


def _ref(ref: dict[str, Any]) -> datamod.DataRef:
    return datamod.DataRef(**{k: ref.get(k) for k in ("dataset", "repo", "rev", "path", "fingerprint", "n_records", "n_users",
                                                       "blocks")})


def _dataset_file(job_path: str, ds: cfgmod.DatasetConfig) -> Path:
    return configs_root(job_path) / "datasets" / f"{ds.name}.yaml"


def _budget_view(b: DatasetBudget, read: Optional[list[str]] = None) -> dict[str, Any]:
    """A dataset's budget as figures; for a partitioned dataset also each block's, and with
    ``read`` those of the blocks a run read (``blocks_read``)."""
    out: dict[str, Any] = {"dataset": b.name, "spent": b.spent, "remaining": b.remaining, "epsilon_cap": b.epsilon_cap,
                           "delta": b.delta}
    if b.blocks:
        out["blocks"] = [{"name": x.name, "n": x.n_records, "epsilon_cap": x.epsilon_cap, "spent": x.spent,
                          "remaining": x.remaining} for x in b.blocks]
        if read is not None:
            out["blocks_read"] = [x for x in out["blocks"] if x["name"] in set(read)]
    return out


def _charged_as(ds: cfgmod.DatasetConfig) -> cfgmod.DatasetConfig:
    """The dataset as the ledger knows it: named by the budget it is charged to (field ``budget_of``)."""
    return ds if ds.budget_of is None else ds.model_copy(update={"name": ds.ledger_name})


def _ledger(ws: Optional[Workspace] = None) -> Ledger:
    """The process's ledger for ``ws`` (:mod:`dpops.pipeline.context`); a stage disposes it when done,
    which returns its connections and keeps the ledger usable."""
    return context.current(ws).ledger


def resolve(job_path: str, repo: Optional[str] = None) -> dict[str, Any]:
    """Stage 1: dataset name + DVC revision -> keyed fingerprint of the content and record count."""
    job, ds = _load(job_path)
    root = datamod.find_repo_root(repo or Path(job_path).resolve().parent)
    ref = datamod.resolve(ds, repo=root, rev=job.data_rev, max_records=job.train_max_records)
    return {**asdict(ref), "version": ref.version}


def validate(job_path: str, ref: dict[str, Any]) -> dict[str, Any]:
    """Stage 2: the dataset's expectation suite; raises before any budget is touched."""
    _, ds = _load(job_path)
    report = validation.validate(_ref(ref), ds)
    return {"success": report.success, "n_records": report.n_records, "checks": len(report.checks)}


def plan(job_path: str, ref: dict[str, Any], *, policy_path: Optional[str] = None) -> dict[str, Any]:
    """Stage 3: noise multiplier calibrated to the job's target epsilon.

    For unit 'user', n is the number of users: the trainer samples and clips users (dpops.train.user_level).
    n also counts every audit canary (each its own unit; about half are trained on), so
    delta < 1/n holds for the largest dataset the run can see.

    A plan whose epsilon its canaries cannot refute (the audit would be INCONCLUSIVE) is refused
    here, before anything is charged, unless the gate's policy (``policy_path``; None: the policy
    defaults) would promote such a model: otherwise the run would spend its budget on a model the
    gate can never promote.
    """
    job, ds = _load(job_path)
    data_ref = _ref(ref)
    preflight(job_path, policy_path=policy_path, repo=data_ref.repo)  # a typo found after reserve costs the charge
    if ds.unit == "user" and data_ref.n_users is None:
        raise ConfigError(
            f"dataset {ds.name!r}: unit 'user' but {data_ref.path} has no column {ds.user_column!r} to count users. "
            "Nothing was charged or trained."
        )
    mode = blocks_mode(job, ds)
    if mode is not None and data_ref.blocks is None:
        raise DataValidationError(
            f"{data_ref.path}: dataset {ds.name!r} is partitioned into blocks, but column {ds.blocks.column!r} is missing "
            "or holds a value that is not a block name. Nothing was charged or trained."
        )
    policy = load_policy(policy_path) if policy_path else PolicyConfig()
    ledger = _ledger() if job.dp.fit_to_budget is not None or mode is not None else None
    named, ds = ds, _charged_as(ds)  # the ledger's figures are those of the budget charged
    try:
        if mode is None:
            planned = privacy.plan(dataset=ds, dp=job.dp, n_records=data_ref.n_units + audit_units(job), ledger=ledger)
        else:  # a partitioned dataset: n is the units of the blocks read (+ canaries), and the charge names them.
            blocks = privacy.blocks_in(ledger, ds, data_ref.blocks, source=data_ref.path)
            planned = privacy.plan_blocks(dataset=ds, dp=job.dp, blocks=blocks, extra_units=audit_units(job),
                                          ledger=ledger, mode=mode)
            if ds.unit == "user":  # read-only here; reserve checks again under the lock
                ledger.check_user_blocks(ds.name, datamod.keyed_user_blocks(data_ref, ds, list(planned.blocks)))
    except ConfigError as exc:  # name the file that holds the field (e.g. privacy.delta)
        raise ConfigError(f"{_dataset_file(job_path, named)}: {exc}") from None
    finally:
        if ledger is not None:
            ledger.dispose()
    _check_auditable(job_path, job, planned, policy, policy_path)
    return planned.to_dict()


def audit_units(job: cfgmod.JobConfig) -> int:
    """Units the audit adds to n: every input canary and every gradient canary (each its own unit)."""
    return job.audit.canaries + job.audit.gradient_canaries


def _check_auditable(
    job_path: str, job: cfgmod.JobConfig, planned: Plan, policy: PolicyConfig, policy_path: Optional[str]
) -> None:
    """Refuse a plan the audit could only call INCONCLUSIVE when the policy never promotes that verdict.

    The ceiling is what the audit could reach given the plan (:func:`dpops.assess.bounds.planned_ceiling`:
    its q, steps, canaries and delta); the audit's claim is the epsilon of the steps run, at most
    the plan's, and fewer steps lower its ceiling too, so the audit stage judges again.
    """
    if not policy.require_audit_pass or policy.accept_inconclusive:
        return
    ceiling, strongest = bounds.planned_ceiling(job.audit.canaries, job.audit.gradient_canaries, sample_rate=planned.sample_rate,
                                                  steps=planned.steps, delta=planned.delta)
    if planned.epsilon < ceiling:
        return
    source = policy_path or "the policy defaults (no policy file given)"
    raise ConfigError(
        f"{job_path}: the run would claim epsilon {planned.epsilon:.3f} (field 'dp.target_epsilon' is "
        f"{job.dp.target_epsilon:g}), but its canaries (field 'audit.canaries' ({job.audit.canaries}), field "
        f"'audit.gradient_canaries' ({job.audit.gradient_canaries})) can refute at most epsilon {ceiling:.3f} at delta "
        f"{planned.delta:g}, q = {planned.sample_rate:.3g} and {planned.steps} steps (the {strongest}, if the run "
        f"memorised every canary it sampled): the audit would be INCONCLUSIVE, which {source} never promotes "
        "(accept_inconclusive: false). Raise audit.gradient_canaries (white-box canaries cost no records), "
        "lower dp.target_epsilon, or set accept_inconclusive: true in the policy. Nothing was charged or trained."
    )


def _plan_obj(p: dict[str, Any]) -> Plan:
    return Plan(**p)


def reserve(job_path: str, ref: dict[str, Any], p: dict[str, Any], *, flow_run_id: Optional[str] = None) -> str:
    """Stage 4: register the dataset if new (and, when partitioned, the blocks of this data
    version the ledger does not know yet, n = each block's units), then admit the planned charge
    atomically, naming the blocks the plan chose."""
    spec = _spec(job_path)
    job, named = spec.job, spec.dataset
    ds = _charged_as(named)  # a linked dataset (field budget_of) is charged to the first dataset's entry
    ledger = _ledger()
    try:
        proposed = filter_from_dict(p.get("privacy_filter"))  # used only if the dataset is new
        ledger.register_dataset(name=ds.name, unit=ds.unit, delta=ds.privacy.delta, epsilon_cap=ds.privacy.epsilon_cap,
                                contribution_bound=ds.contribution_bound, source=ds.source,
                                linked_from=named.name if named.budget_of else None,
                                privacy_filter=proposed or ds.privacy.privacy_filter or filters.GRID_FILTER,
                                filter_from_config=ds.privacy.filter_orders is not None)
        if ds.blocks is not None:
            if not p.get("blocks"):
                raise ConfigError(f"{_dataset_file(job_path, named)}: dataset {ds.name!r} is partitioned into blocks "
                                         "but the plan names none; plan again")
            data_ref = _ref(ref)
            try:
                privacy.register_blocks(ledger, ds, privacy.blocks_in(ledger, ds, data_ref.blocks, source=data_ref.path))
                # again: a block another run registered in between must have this version's count
                privacy.blocks_in(ledger, ds, data_ref.blocks, source=data_ref.path)
            except ConfigError as exc:
                raise ConfigError(f"{_dataset_file(job_path, named)}: {exc}") from None
        mapped = (datamod.keyed_user_blocks(_ref(ref), ds, list(p["blocks"]))
                  if ds.blocks is not None and ds.unit == "user" else None)
        charge = privacy.reserve(
            ledger, _plan_obj(p), job=job.name, data_version=ref["version"], flow_run_id=flow_run_id,
            code_version=tracking.git_commit(ref["repo"]), user_blocks=mapped, spec_hash=spec.digest,
        )
        return charge.id
    finally:
        ledger.dispose()


def train(job_path: str, ref: dict[str, Any], p: dict[str, Any], charge_id: str) -> dict[str, Any]:
    """Stage 5: check the plan is the charge, mark the charge running (durably, before reading
    data), then DP fine-tune.

    The plan ``p`` arrives as a parameter (of a Prefect task or a ``dp-train`` deployment run):
    before the charge starts it is compared with what the ledger charged (:func:`_check_plan`), and
    a plan that differs in any figure is refused and its reservation released; the trainer then
    checks it again against the running charge (:func:`dpops.train.trainer.authorize`).

    The audit's canaries are drawn first and the included ones appended to the training records;
    which were included stays in the run directory (``canaries_path`` in the result). The key that
    chooses the records kept of each user (unit 'user', :func:`training_records`) is drawn here,
    once, so that every process of the run keeps the same ones.
    With ``training.nproc_per_node`` above 1 the training runs in that many processes
    (:mod:`dpops.train.distributed`, torchrun), which read the records themselves; the result is rank 0's.
    Progress is recorded before each chunk of steps (:func:`progress_recorder`), and a
    ``finished`` event with the steps run once the trainer has returned (the only steps below the
    reserved ones :func:`settle` may commit). If anything fails after the charge is running (a
    process killed included), it becomes ``failed_charged``: data was read, so the spend is real.
    What this machine cannot run (no GPU, too few GPUs) is refused before the charge starts, and
    the reservation is released.
    """
    spec = _spec(job_path)
    job, ds = spec.job, spec.dataset
    ws = workspace()
    run_dir = ws.runs / charge_id
    ledger = _ledger(ws)
    try:
        _check_spec(ledger, spec, charge_id)
        _check_machine(ledger, job, job_path, charge_id)
        _check_plan(ledger, ds, p, job_path, charge_id)
        charge = ledger.start(charge_id)  # refused for a charge already started: nothing below happens
        try:
            drawn = canaries.draw(job.audit.canaries, n_labels=len(ds.labels), seed=job.seed)
            canaries_path = drawn.save(run_dir / canaries.FILE)
            gradient = canaries.draw_gradient(job.audit.gradient_canaries, seed=job.seed) if job.audit.gradient_canaries else None
            gradient_path = gradient.save(run_dir / canaries.GRADIENT_FILE) if gradient else None
            subset_key = users.new_subset_key()
            if job.training.nproc_per_node > 1:
                result = launch.train_processes(job_path=job_path, ref=ref, plan=p, charge_id=charge_id, canaries_path=canaries_path,
                                                run_dir=run_dir, nproc=job.training.nproc_per_node, subset_key=subset_key,
                                                gradient_canaries_path=str(gradient_path) if gradient_path else None)
            else:
                df = training_records(job, ds, ref, p, drawn, subset_key=subset_key)
                result = asdict(training.train(job, _plan_obj(p), df, dataset=ds, charge=charge, labels=list(ds.labels),
                                               output_dir=run_dir / "model", gradient_canaries=gradient,
                                               on_step=progress_recorder(ledger, charge_id, total_steps=p["steps"])))
            # The trainer returned (torchrun: every rank, checked): its completed result, the only
            # steps below the reserved ones that settle may commit.
            ledger.record_finished(charge_id, steps_run=result["steps_run"])
        except BaseException as exc:
            ledger.fail(charge_id, reason=f"{type(exc).__name__} during training")
            raise
        return {**result, "canaries_path": str(canaries_path),
                "gradient_canaries_path": str(gradient_path) if gradient_path else None}
    finally:
        ledger.dispose()


def _check_blocks_read(df: pd.DataFrame, ref: dict[str, Any], p: dict[str, Any]) -> None:
    """The records loaded are exactly those of the blocks the charge names, at resolve's counts."""
    expected = sum(ref["blocks"][b] for b in p["blocks"])
    if users.units(df) != expected:
        raise PrivacyError(
            f"loaded {users.units(df)} units from blocks {p['blocks']}, but the plan counted {expected}; refusing to train"
        )


def spec_difference(spec: RunSpec, charge: Charge) -> Optional[str]:
    """Why ``spec`` is not the configuration ``charge`` was reserved for (None: it is, or the charge
    predates spec digests). Names the job file and both digests; configs are public, records unread."""
    if charge.spec_hash is None or charge.spec_hash == spec.digest:
        return None
    return (f"{spec.job_path}: the job or dataset config changed after charge {charge.id} was reserved "
            f"(configs now {spec.digest[:19]}..., charged for {charge.spec_hash[:19]}...); plan and reserve again")


def _check_spec(ledger: Ledger, spec: RunSpec, charge_id: str) -> None:
    """Refuse, before the charge starts, configs edited since the reservation; release it."""
    charge = ledger.charge(charge_id)
    why = spec_difference(spec, charge)
    if why is None:
        return
    if charge.state == RESERVED:
        ledger.release(charge_id, reason=f"refused before training: {why}")
    raise ConfigError(f"{why}. Nothing was read or trained"
                             + ("; the reservation was released." if charge.state == RESERVED else "."))


def _check_machine(ledger: Ledger, job: cfgmod.JobConfig, job_path: str, charge_id: str) -> None:
    """Refuse, before the charge starts, a job this machine cannot train; release its reservation."""
    try:
        launch.check_machine(job)
    except ConfigError as exc:
        if ledger.charge(charge_id).state == RESERVED:
            ledger.release(charge_id, reason=f"refused before training: {exc}")
        raise ConfigError(f"{job_path}: {exc}. Nothing was read or trained.") from None


def _check_plan(ledger: Ledger, ds: cfgmod.DatasetConfig, p: dict[str, Any], job_path: str, charge_id: str) -> None:
    """Refuse, before the charge starts, a plan that is not the mechanism the ledger charged.

    Compared with the charge (:func:`dpops.privacy.plan.charge_differences`: sigma, q, steps, C, n,
    unit, blocks, dataset) and with the dataset's registered delta (the figure every reported
    epsilon is computed at). On a difference the reservation is released, with the differences as
    its reason, rather than left reserved: nothing was read yet (the charge is still ``reserved``),
    so releasing is exact; it frees the budget now rather than when the lease runs out, and the
    reason stays on the dataset's hash chain, where a privacy officer sees that a run was handed a
    plan it was not charged for.
    """
    charge = ledger.charge(charge_id)
    found = charge_differences(_plan_obj(p), charge, unit=ds.unit, delta=ledger.budget(charge.dataset).delta)
    if not found:
        return
    why = f"the plan handed to the train stage is not what charge {charge_id} admitted: {'; '.join(found)}"
    if charge.state == RESERVED:
        ledger.release(charge_id, reason=f"refused before training: {why}")
    raise PrivacyError(f"{job_path}: {why}. Nothing was read or trained"
                       + ("; the reservation was released." if charge.state == RESERVED else "."))


#: A running charge's progress is appended to the ledger (a ``progress`` event) once per this many steps.
PROGRESS_EVERY = 10


def progress_recorder(ledger: Ledger, charge_id: str, *, total_steps: int, every: Optional[int] = None):
    """The trainer's ``on_step``: before each chunk of ``every`` steps, durably record the steps
    the run will have taken at its end (before step 1: 10; before step 11: 20; at most
    ``total_steps``).

    Recorded before the steps, not after, so the last progress is never below the steps actually
    taken, wherever the run dies (a kill mid-chunk, an exception in a step or in this very call:
    the steps it announces are not taken until it returns); ``Ledger.commit`` refuses fewer. It
    changes no figure: a run that dies stays charged at its reserved size.
    """
    every = every or PROGRESS_EVERY

    def on_step(step: int) -> None:  # ``step`` is about to be taken
        if (step - 1) % every == 0:
            ledger.record_progress(charge_id, steps_done=min(step - 1 + every, total_steps))
    return on_step


def training_records(
    job: cfgmod.JobConfig, ds: cfgmod.DatasetConfig, ref: dict[str, Any], p: dict[str, Any], drawn: canaries.Canaries,
    *, subset_key: bytes,
) -> pd.DataFrame:
    """The records a charge trains on: the training split as resolved (fingerprint-checked), for
    unit 'user' at most ``contribution_bound`` records of each user (a uniformly random subset
    chosen by ``subset_key``, :func:`dpops.train.user_level.bound_contributions`), plus the included canaries.
    Reads private records; every training process calls it (``p`` is the plan the charge admitted)."""
    df = datamod.load_split(_ref(ref), ds, max_records=job.train_max_records, blocks=p.get("blocks"))
    if p.get("blocks"):
        _check_blocks_read(df, ref, p)
    if ds.unit == "user":
        df = users.bound_contributions(df, ds.contribution_bound, subset_key)
    rows = drawn.training_rows()
    if "user" in df.columns:  # unit 'user': each canary is a user of its own
        rows = rows.assign(user=[f"dpops-canary-{i}" for i in range(len(rows))])
    return pd.concat([df, rows], ignore_index=True)


def settle(charge_id: str, steps_run: int) -> dict[str, Any]:
    """Stage 6: commit the charge at the steps actually run; return the dataset's budget (and, for
    a partitioned dataset, every block's, and those of the blocks read as ``blocks_read``).

    ``steps_run`` is the train stage's result. The ledger accepts it below the reserved steps only
    when it is exactly what the trainer's ``finished`` event says (the train stage wrote it), and
    never below the recorded progress: a run that died cannot be settled for less than it ran.
    """
    ledger = _ledger()
    try:
        charge = privacy.settle(ledger, charge_id, steps_run=steps_run)
        return _budget_view(ledger.budget(charge.dataset), read=list(charge.blocks))
    finally:
        ledger.dispose()


def evaluate(job_path: str, ref: dict[str, Any], model_dir: str) -> dict[str, float]:
    """Stage 7: utility on the held-out evaluation split."""
    job, ds = _load(job_path)
    df = datamod.load_split(_ref(ref), ds, path=ds.files.eval, max_records=job.eval_max_records)
    return evaluation.evaluate(model_dir, df, batch_size=job.eval_batch_size, loaded=context.current().model(model_dir))


def audit(
    job_path: str, p: dict[str, Any], model_dir: str, steps_run: int, canaries_path: str, *,
    trained: Optional[dict[str, Any]] = None, charge_id: Optional[str] = None,
) -> dict[str, Any]:
    """Stage 8: black-box canaries, white-box gradient canaries, accounting cross-check (:mod:`dpops.assess.audit`).

    Reads no record of the dataset (it is not given the data reference): only the canaries are
    scored, by the DP model against the base model it started from (the same seed), and the
    gradient canaries from the released noisy sums the trainer kept; every figure is
    post-processing of the DP output. The claim is the mechanism of the ledger charge
    (``charge_id``; without one, the plan ``p``) at the steps run; the cross-check accounts the
    mechanism the trainer's own record (``trained``: its result) says it ran. Writes the report
    (JSON, markdown, plot; figures only) beside the canaries and returns the audit's figures with
    ``report_dir``.
    """
    job, _ = _load(job_path)
    drawn = canaries.Canaries.load(Path(canaries_path))
    rows = drawn.all_rows()
    c_loss, _ = evaluation.per_example_loss(model_dir, rows, batch_size=job.eval_batch_size,
                                            loaded=context.current().model(model_dir))
    base_loss = evaluation.base_per_example_loss(model_dir, rows, seed=job.seed, batch_size=job.eval_batch_size)
    scores = (base_loss - c_loss).tolist()  # calibrated: how much training lowered each canary's loss
    claimed = dict(p)
    if charge_id is not None:
        ledger = _ledger()
        try:
            charge = ledger.charge(charge_id)
        finally:
            ledger.dispose()
        claimed.update(noise_multiplier=charge.mechanism.noise_multiplier, sample_rate=charge.mechanism.sample_rate,
                       max_grad_norm=charge.max_grad_norm)
    trained = {k: v for k, v in (trained or {}).items() if v is not None}
    ran = SubsampledGaussian(trained.get("noise_multiplier", claimed["noise_multiplier"]),
                             trained.get("sample_rate", claimed["sample_rate"]), trained.get("steps_run", steps_run))
    white: dict[str, Any] = {}
    gradient_path, observations_path = trained.get("gradient_canaries_path"), trained.get("gradient_observations")
    if gradient_path and observations_path:
        grad = canaries.GradientCanaries.load(Path(gradient_path))
        white = {"white_box_observations": np.load(observations_path), "white_box_included": grad.included,
                 "white_box_coordinates": canaries.gradient_coordinates(int(trained["trainable_parameters"]), grad.count, grad.seed)}
    result = auditing.run_audit(
        canary_scores=scores, canary_included=drawn.included, canary_scoring="loss under the base model - loss under the DP model",
        mechanism=SubsampledGaussian(claimed["noise_multiplier"], claimed["sample_rate"], steps_run), delta=p["delta"],
        trained=ran, max_grad_norm=claimed.get("max_grad_norm"), trained_max_grad_norm=trained.get("max_grad_norm"), **white,
    )
    report_dir = Path(canaries_path).parent / "audit"
    wb_scores = (auditing.white_box_scores(white["white_box_observations"], noise_multiplier=claimed["noise_multiplier"],
                                           sample_rate=claimed["sample_rate"]) if white else None)
    audit_report.write(result, report_dir, canary_scores=scores, canary_included=drawn.included,
                       white_box_scores=wb_scores, white_box_included=white.get("white_box_included"))
    return {**result.to_dict(), "report_dir": str(report_dir)}
