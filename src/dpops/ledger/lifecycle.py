"""A charge's life after admission: start, progress, commit, fail, release; the model it trained, its evidence, the gate's decisions."""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional

from sqlalchemy import (
    select,
)
from sqlalchemy.engine import Connection

from dpops.errors import (
    IllegalTransitionError,
    LeaseExpiredError,
    LedgerError,
)
from dpops.ledger.schema import _DATASETS, _EVENTS, _PG_BINDING_LOCK, _STATES, _Locked
from dpops.ledger.states import (
    ANCHORED,
    COMMITTED,
    EVIDENCE,
    EVIDENCE_FIGURES,
    EXPIRED,
    FAILED_CHARGED,
    FINISHED,
    GATE_KEYS,
    MODEL_BOUND,
    PROGRESS,
    RELEASED,
    RUNNING,
    TRANSITIONS,
    ChainHead,
    Charge,
)


class _Lifecycle:
    """A charge's life after admission: start, progress, commit, fail, release; the model it trained, its evidence, the gate's decisions."""

    def _transition(self, charge_id: str, new_state: str, payload: dict[str, Any], *, counted: Optional[int] = None,
                    check: Optional[Callable[[Connection, int], None]] = None) -> Charge:
        """Move a charge to ``new_state``; ``counted`` is the steps it counts afterwards
        (default: unchanged). ``check(conn, steps_planned)``, if given, runs under the dataset's
        lock once the move is known to be allowed, and may refuse it by raising."""
        with self.engine.begin() as conn:
            dataset_id, planned = self._charge_row(conn, charge_id)
            ds = self._lock_dataset(conn, dataset_id=dataset_id)
            self._expire_stale(conn, ds)
            cs = _STATES.c
            state, was, lease = conn.execute(
                select(cs.state, cs.steps_counted, cs.lease_expires_at).where(cs.charge_id == charge_id)).one()
            if state == EXPIRED and new_state == RUNNING:
                expired_at = lease  # commit the expiry event, then refuse below
            elif new_state not in TRANSITIONS[state]:
                raise IllegalTransitionError(
                    f"charge {charge_id}: cannot go from {state!r} to {new_state!r}"
                    + (" (data was read: the spend is real and is never released)" if new_state == RELEASED else "")
                )
            else:
                expired_at = None
                if check is not None:
                    check(conn, planned)
                self._set_state(conn, ds, charge_id, new_state, payload,
                                counted=was if counted is None else counted, was_counted=was)
        if expired_at:
            raise LeaseExpiredError(f"charge {charge_id}: the reservation expired at {expired_at}; plan and reserve again")
        if new_state in ANCHORED:
            self._anchor(ds, new_state)
        return self.charge(charge_id)

    def start(self, charge_id: str) -> Charge:
        """Mark a charge ``running``. Call this, durably, before the first private record is read."""
        return self._transition(charge_id, RUNNING, {})

    def commit(self, charge_id: str, *, steps_run: int) -> Charge:
        """Settle a running charge at the steps actually run.

        At the steps reserved, always (the charge counts in full). Below them only at exactly the
        steps of the trainer's own completed result (its ``finished`` event, see
        :meth:`record_finished`): a run that died has none, and whoever settles it cannot claim
        it ran fewer steps than it did. Never below the last ``progress`` (which bounds the steps
        taken from above). Every check reads the events under the dataset's lock, in the
        transaction that commits, so a progress event written concurrently cannot slip in between.
        """
        def check(conn: Connection, planned: int) -> None:
            if not (0 <= steps_run <= planned):
                raise LedgerError(f"charge {charge_id}: steps_run must be in [0, {planned}] (the reserved steps). Found {steps_run}.")
            done = self._last_progress(conn, charge_id)
            if steps_run < done:
                raise LedgerError(f"charge {charge_id}: steps_run {steps_run} is below the {done} steps its progress events record")
            finished = self._finished(conn, charge_id)
            if steps_run < planned and finished != steps_run:
                raise LedgerError(
                    f"charge {charge_id}: steps_run {steps_run} is below the {planned} reserved steps, which is accepted only "
                    "at the steps of the trainer's completed result; "
                    + ("it recorded none (the run did not finish)" if finished is None else f"it ran {finished}")
                )

        return self._transition(charge_id, COMMITTED, {"steps_run": int(steps_run)}, counted=int(steps_run), check=check)

    def record_progress(self, charge_id: str, *, steps_done: int) -> None:
        """Append a durable ``progress`` event: a running charge may take up to ``steps_done`` noisy steps.

        The trainer records it *before* the steps it announces (:func:`dpops.pipeline.stages.progress_recorder`),
        so the last progress is never below the steps actually taken, wherever the run dies; a
        commit is never below it. It changes no figure: a running charge counts its reserved
        steps, and one that dies stays charged at that size. ``steps_done`` must not go back and
        must not pass the steps reserved; none is recorded once the trainer has finished.
        """
        self._append_steps(charge_id, PROGRESS, "steps_done", steps_done, what="progress")

    def record_finished(self, charge_id: str, *, steps_run: int) -> None:
        """Append the trainer's completed result: a running charge's training returned after ``steps_run`` steps.

        Written once, by the stage that ran the trainer, only when it returned (a run that dies
        writes none); :meth:`commit` accepts fewer steps than reserved only at exactly these.
        ``steps_run`` must be in [last progress, reserved].
        """
        self._append_steps(charge_id, FINISHED, "steps_run", steps_run, what="a finished result")

    def _append_steps(self, charge_id: str, kind: str, field: str, steps: int, *, what: str) -> None:
        """Append a ``progress`` or ``finished`` event of a running charge, under its dataset's lock:
        ``steps`` (the payload's ``field``) must be in [last progress, reserved]."""
        with self.engine.begin() as conn:
            ds, planned = self._lock_running(conn, charge_id, what)
            last = self._last_progress(conn, charge_id)
            if not (last <= steps <= planned):
                raise LedgerError(f"charge {charge_id}: {field} must be in [{last}, {planned}] (last progress, reserved). "
                                  f"Found {steps}.")
            self._append(conn, ds, kind, charge_id, {field: int(steps)})

    def _lock_running(self, conn: Connection, charge_id: str, what: str) -> tuple[_Locked, int]:
        """Lock the charge's dataset; refuse unless the charge is running and its trainer has not
        finished. Returns the locked dataset and the charge's reserved steps."""
        dataset_id, planned = self._charge_row(conn, charge_id)
        ds = self._lock_dataset(conn, dataset_id=dataset_id)
        state = conn.scalar(select(_STATES.c.state).where(_STATES.c.charge_id == charge_id))
        if state != RUNNING:
            raise LedgerError(f"charge {charge_id}: {what} is recorded only while running; it is {state!r}")
        if self._finished(conn, charge_id) is not None:
            raise LedgerError(f"charge {charge_id}: its trainer has already finished")
        return ds, planned

    @staticmethod
    def _last_progress(conn: Connection, charge_id: str) -> int:
        e = _EVENTS.c
        payload = conn.scalar(select(e.payload).where(e.charge_id == charge_id, e.kind == PROGRESS)
                              .order_by(e.seq.desc()).limit(1))
        return int(json.loads(payload)["steps_done"]) if payload else 0

    @staticmethod
    def _finished(conn: Connection, charge_id: str) -> Optional[int]:
        """The steps of the charge's ``finished`` event; None when it has none."""
        e = _EVENTS.c
        payload = conn.scalar(select(e.payload).where(e.charge_id == charge_id, e.kind == FINISHED).limit(1))
        return int(json.loads(payload)["steps_run"]) if payload else None

    def progress(self, charge_id: str) -> int:
        """The last steps_done recorded for a charge (0 when none)."""
        with self.engine.connect() as conn:
            return self._last_progress(conn, charge_id)

    def fail(self, charge_id: str, *, reason: str) -> Charge:
        """A running charge whose run died: it stays charged at its reserved size."""
        return self._transition(charge_id, FAILED_CHARGED, {"reason": reason})

    def release(self, charge_id: str, *, reason: str) -> Charge:
        """Release a reservation that never read data. Refused once the charge is running."""
        if not reason.strip():
            raise LedgerError("a release needs a reason")
        return self._transition(charge_id, RELEASED, {"reason": reason}, counted=0)

    def annotate(self, charge_id: str, **fields: Any) -> None:
        """Append free-form lineage learnt later as an ``annotated`` event; the charge row stays as written.

        The gate reads nothing from these notes. The keys the model binding and the gate's evidence
        own (:data:`GATE_KEYS`) are refused: they are written once, by :meth:`bind_model` and
        :meth:`record_evidence`, so that a later note cannot re-point a charge at another model
        or rewrite its accuracy.
        """
        owned = sorted(GATE_KEYS & set(fields))
        if owned:
            raise LedgerError(f"charge {charge_id}: annotate cannot write {owned}: the model binding and the gate's evidence "
                              "are written once, by bind_model and record_evidence")
        with self.engine.begin() as conn:
            ds = self._lock_dataset(conn, dataset_id=self._charge_row(conn, charge_id).dataset_id)
            self._append(conn, ds, "annotated", charge_id, fields)

    def bind_model(self, charge_id: str, *, model_name: str, model_version: str | int, mlflow_run_id: str,
                   artifact_sha256: str) -> None:
        """Bind the model version a charge trained to it: a ``model_bound`` event, written once.

        ``artifact_sha256`` is the SHA-256 of the version's weight file (``trainable.safetensors``,
        the DP output; its hash is post-processing): serving compares it with the weights it loads.
        Written under the dataset's lock; a second binding of the charge is refused, and so is a
        binding of a model version already bound to any charge of any dataset (one charge per
        version; on PostgreSQL an advisory lock serialises bindings across datasets, on SQLite the
        write lock is database-wide).

        Raises:
            LedgerError: a field is malformed, the charge is already bound, or the version is.
        """
        version = str(model_version).strip()
        if not (isinstance(model_name, str) and model_name.strip() and len(model_name) <= 200):
            raise LedgerError(f"charge {charge_id}: field 'model_name' must be a non-empty name of at most 200 characters")
        if not version.isdigit():
            raise LedgerError(f"charge {charge_id}: field 'model_version' must be an MLflow version number. Found {version!r:.40}.")
        if not (isinstance(mlflow_run_id, str) and mlflow_run_id.strip() and len(mlflow_run_id) <= 100):
            raise LedgerError(f"charge {charge_id}: field 'mlflow_run_id' must be a non-empty id of at most 100 characters")
        if not (isinstance(artifact_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", artifact_sha256)):
            raise LedgerError(f"charge {charge_id}: field 'artifact_sha256' must be 64 lowercase hex digits")
        binding = {"model_name": model_name, "model_version": str(int(version)), "mlflow_run_id": mlflow_run_id,
                   "artifact_sha256": artifact_sha256}
        with self.engine.begin() as conn:
            if self._pg:  # before the dataset's lock, always in this order: no deadlock
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_BINDING_LOCK})")
            ds = self._lock_dataset(conn, dataset_id=self._charge_row(conn, charge_id).dataset_id)
            for bound_charge, _dataset, payload in self._bindings(conn):
                if bound_charge == charge_id:
                    raise LedgerError(f"charge {charge_id} is already bound to model {payload['model_name']}/"
                                      f"{payload['model_version']}; a binding is written once")
                if (payload["model_name"], payload["model_version"]) == (model_name, binding["model_version"]):
                    raise LedgerError(f"model {model_name}/{binding['model_version']} is already bound to charge {bound_charge}; "
                                      "a model version is bound to one charge")
            self._append(conn, ds, MODEL_BOUND, charge_id, binding)

    def record_evidence(self, charge_id: str, *, task: str, figures: dict[str, float], audit: dict[str, Any]) -> ChainHead:
        """Record the gate's evidence on a bound charge: an ``evidence`` event, written once.

        ``figures`` are the utility figures of the eval split (:data:`EVIDENCE_FIGURES`), ``audit``
        the audit's verdict and figures (canaries only). Written under the dataset's lock, after
        the model binding; a second record is refused. Returns the chain head after it (anchored).

        Raises:
            LedgerError: a field is malformed, the charge has no binding, or its evidence is recorded.
        """
        if not (isinstance(task, str) and task.strip() and len(task) <= 100):
            raise LedgerError(f"charge {charge_id}: field 'task' must be a non-empty name of at most 100 characters")
        unknown = sorted(set(figures) - set(EVIDENCE_FIGURES))
        if unknown:
            raise LedgerError(f"charge {charge_id}: evidence figures {unknown} are not among {list(EVIDENCE_FIGURES)}")
        for name, value in figures.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise LedgerError(f"charge {charge_id}: evidence figure {name!r} must be a number")
        if not (isinstance(audit, dict) and isinstance(audit.get("verdict"), str)):
            raise LedgerError(f"charge {charge_id}: field 'audit' must be the audit's figures with a 'verdict'")
        with self.engine.begin() as conn:
            ds = self._lock_dataset(conn, dataset_id=self._charge_row(conn, charge_id).dataset_id)
            if not self._charge_payloads(conn, charge_id, MODEL_BOUND):
                raise LedgerError(f"charge {charge_id} is bound to no model: bind_model comes before its evidence")
            if self._charge_payloads(conn, charge_id, EVIDENCE):
                raise LedgerError(f"charge {charge_id}: its evidence is already recorded; evidence is written once")
            self._append(conn, ds, EVIDENCE, charge_id,
                         {"task": task, **{k: float(v) for k, v in figures.items()}, "audit": audit})
        return self._anchor(ds, EVIDENCE)

    @staticmethod
    def _charge_payloads(conn: Connection, charge_id: str, kind: str) -> list[dict[str, Any]]:
        e = _EVENTS.c
        return [json.loads(p) for p in conn.scalars(
            select(e.payload).where(e.charge_id == charge_id, e.kind == kind).order_by(e.seq))]

    @staticmethod
    def _bindings(conn: Connection) -> list[tuple[str, str, dict[str, Any]]]:
        """Every ``model_bound`` event of the ledger, as (charge id, dataset, payload), in chain order."""
        e, d = _EVENTS.c, _DATASETS.c
        rows = conn.execute(select(e.charge_id, d.name, e.payload).join(_DATASETS, d.id == e.dataset_id)
                            .where(e.kind == MODEL_BOUND).order_by(d.name, e.seq))
        return [(cid, name, json.loads(payload)) for cid, name, payload in rows]

    def charge_records(self, charge_id: str, kind: str) -> list[dict[str, Any]]:
        """The payloads of a charge's events of ``kind`` (e.g. :data:`MODEL_BOUND`, :data:`EVIDENCE`), in chain order."""
        with self.engine.connect() as conn:
            self._charge_row(conn, charge_id)
            return self._charge_payloads(conn, charge_id, kind)

    def evidence_of(self, dataset: str) -> list[tuple[str, dict[str, Any]]]:
        """Every ``evidence`` event of ``dataset``, as (charge id, payload), in chain order: the
        past runs' audits, for pooling them (:func:`dpops.pooling.dataset_pool`). Read from the
        hash-chained events (the record), not the annotations; LedgerError if ``dataset`` is unknown."""
        e = _EVENTS.c
        with self.engine.connect() as conn:
            ds = self._dataset(conn, dataset)
            rows = conn.execute(select(e.charge_id, e.payload).where(e.dataset_id == ds.id, e.kind == EVIDENCE).order_by(e.seq))
            return [(cid, json.loads(payload)) for cid, payload in rows]

    def bindings_of(self, model_name: str, model_version: str | int) -> list[tuple[str, str, dict[str, Any]]]:
        """The (charge id, dataset, binding) of every charge bound to this model version, across
        the ledger: one for a version a dpops run recorded, none for any other."""
        version = str(model_version)
        with self.engine.connect() as conn:
            return [b for b in self._bindings(conn) if (b[2]["model_name"], b[2]["model_version"]) == (model_name, version)]

    def gate_decisions(self, model: str) -> list[dict[str, Any]]:
        """Every ``gate_decision`` for ``model`` (``"name/version"``) across datasets, oldest first
        (by time, then dataset and seq), each as {dataset, seq, at, charge, payload}."""
        e, d = _EVENTS.c, _DATASETS.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(d.name, e.seq, e.created_at, e.charge_id, e.payload)
                                .join(_DATASETS, d.id == e.dataset_id).where(e.kind == "gate_decision"))
            found = [{"dataset": name, "seq": seq, "at": at, "charge": cid, "payload": json.loads(payload)}
                     for name, seq, at, cid, payload in rows]
        return sorted((f for f in found if f["payload"].get("model") == model), key=lambda f: (f["at"], f["dataset"], f["seq"]))

    def record_decision(self, dataset: str, *, decision: dict[str, Any]) -> ChainHead:
        """Append a gate decision to the dataset's chain; return the chain head after it (anchored)."""
        with self.engine.begin() as conn:
            ds = self._lock_dataset(conn, dataset)
            self._append(conn, ds, "gate_decision", decision.get("charge_id"), decision)
        return self._anchor(ds, "gate_decision")
