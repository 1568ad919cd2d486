"""The hash chain: each event's hash, a charge's fields as its ``reserved`` event copies them, and the
replay of a dataset's events that :meth:`~dpops.ledger.store.Ledger.verify` and admission share.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Optional

import numpy as np

from dpops.errors import (
    LedgerError,
)
from dpops.ledger.spend import _filter
from dpops.ledger.states import (
    COMMITTED,
    EXPIRED,
    FINISHED,
    PROGRESS,
    RESERVED,
    RUNNING,
    TRANSITIONS,
    UNCHARGED,
    Charge,
)
from dpops.privacy import accounting, filters


def _now(offset_seconds: float = 0.0) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=offset_seconds)).isoformat(timespec="microseconds")


def _event_hash(dataset: str, seq: int, kind: str, charge_id: Optional[str], payload: str, created_at: str, prev: str) -> str:
    body = json.dumps([dataset, seq, kind, charge_id, payload, created_at, prev], separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


#: Fields of a charge row besides its id and dataset, in the order of its `reserved` event.
CHARGE_FIELDS = (
    "kind", "sampler", "noise_multiplier", "sample_rate", "steps_planned", "max_grad_norm", "unit", "neighbouring",
    "n_records", "job", "data_version", "flow_run_id", "code_version", "created_at", "lease_expires_at", "spec_hash",
)


def _charge_payload(row: Any) -> dict[str, Any]:
    """The immutable fields of a charge row, copied into its `reserved` event for verify()."""
    return {name: getattr(row, name) for name in CHARGE_FIELDS}


def _charge_fields(charge: Charge) -> dict[str, Any]:
    """The row fields of a new charge (what :func:`_charge_payload` reads back from its row)."""
    return {
        "kind": accounting.KIND_SUBSAMPLED_GAUSSIAN,
        "sampler": accounting.SAMPLER_POISSON,
        "noise_multiplier": float(charge.mechanism.noise_multiplier),
        "sample_rate": float(charge.mechanism.sample_rate),
        "steps_planned": int(charge.mechanism.steps),
        "max_grad_norm": charge.max_grad_norm,
        "unit": charge.unit,
        "neighbouring": charge.neighbouring,
        "n_records": charge.n_records,
        "job": charge.job,
        "data_version": charge.data_version,
        "flow_run_id": charge.flow_run_id,
        "code_version": charge.code_version,
        "created_at": charge.created_at,
        "lease_expires_at": charge.lease_expires_at,
        "spec_hash": charge.spec_hash,
    }


#: The states a charge's first event may take: those no transition leads to (``reserved``).
INITIAL_STATES: frozenset[str] = frozenset(TRANSITIONS) - frozenset().union(*TRANSITIONS.values())


#: Fields of a dataset's terms, as its ``registered`` event and its ``datasets`` row both hold them.
TERM_FIELDS = ("unit", "contribution_bound", "delta", "epsilon_cap", "accountant", "filter_spec")


#: A stored one-step RDP curve within this relative difference of the recomputed one (at every
#: order) is numerical drift, not an edit. The curve is computed in double precision from (sigma, q)
#: by two independent implementations; a library upgrade (numpy, scipy, the RDP code itself) moves
#: its last few digits, i.e. relative differences of 1e-16 to 1e-12. An edit that makes room for a
#: run must lower the curve by far more (a percent of budget is a relative 1e-2), so 1e-9 separates
#: the two with room on both sides.
CURVE_DRIFT_RTOL = 1e-9


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`Ledger.verify_report` found.

    Attributes:
        problems: edits, deletions and broken rules; the ledger verifies only when this is empty.
        drift: stored RDP curves that differ from the recomputed ones in their last digits only
            (see :data:`CURVE_DRIFT_RTOL`): reported, not failed. No lower figure is adopted:
            admission keeps counting the stored curve.
    """

    problems: tuple[str, ...] = ()
    drift: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetTerms:
    """A dataset's terms as its chained ``registered`` event states them."""

    unit: str
    contribution_bound: Optional[int]
    delta: float
    epsilon_cap: float
    accountant: str
    #: The filter's orders and delta shares as canonical JSON (``datasets.filter_spec``); None for v1.
    filter_spec: Optional[str] = None

    @classmethod
    def from_event(cls, payload: dict[str, Any]) -> "DatasetTerms":
        """The terms of a ``registered`` event's payload (field ``filter``: the v2 filter's orders
        and delta shares, absent for v1). Raises LedgerError if a field is missing."""
        fields = [k for k in TERM_FIELDS if k != "filter_spec"]
        missing = [k for k in fields if k not in payload]
        if missing:
            raise LedgerError(f"registered event lacks field(s) {missing}")
        spec = payload.get("filter")
        return cls(**{k: payload[k] for k in fields},
                   filter_spec=None if spec is None else json.dumps(spec, sort_keys=True, separators=(",", ":")))


@dataclass(frozen=True)
class BlockTerms:
    """A block as its chained ``block_added`` event states it."""

    name: str
    epsilon_cap: float
    n_records: int

    @classmethod
    def from_event(cls, payload: dict[str, Any]) -> "BlockTerms":
        """The block of a ``block_added`` event's payload. Raises LedgerError if a field is missing."""
        missing = [k for k in ("block", "epsilon_cap", "n_records") if k not in payload]
        if missing:
            raise LedgerError(f"block_added event lacks field(s) {missing}")
        return cls(payload["block"], payload["epsilon_cap"], payload["n_records"])


def _steps(payload: dict[str, Any], key: str) -> Optional[int]:
    """``payload[key]`` when it is a non-negative integer (a step count), else None."""
    value = payload.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass
class ChargeReplay:
    """One charge's events replayed through the state machine, in chain order.

    The rules come from :data:`TRANSITIONS` (and :data:`INITIAL_STATES`), the same table the write
    path enforces, plus what the write path checks of the step counts: ``progress`` and
    ``finished`` only while running and before the trainer finished, each within [last progress,
    reserved]; a commit within the same range and, below the reserved steps, at exactly the
    finished result; an expiry only once the lease has passed. An event that breaks a rule is not
    applied, so :attr:`state` and :attr:`counted` are what the legal events give.
    """

    #: Payload of the charge's ``reserved`` event (its terms, blocks and lease); None until then.
    reserved: Optional[dict[str, Any]] = None
    state: Optional[str] = None
    progress: int = 0
    finished: Optional[int] = None
    steps_run: Optional[int] = None

    @property
    def planned(self) -> int:
        return int(self.reserved["steps_planned"]) if self.reserved else 0

    @property
    def counted(self) -> int:
        """The steps the charge counts now (what ``charge_states.steps_counted`` must hold)."""
        if self.state is None or self.state in UNCHARGED:
            return 0
        if self.state == COMMITTED and self.steps_run is not None:
            return self.steps_run
        return self.planned

    def apply(self, kind: str, payload: dict[str, Any], created_at: str = "") -> Optional[str]:
        """Apply the charge's next event; return the rule it breaks (and change nothing), or None.

        Events that carry no state (``annotated``, ``gate_decision``) change nothing, but may only
        follow the charge's reservation like every other.
        """
        if self.state is None and kind not in INITIAL_STATES:
            return f"its first event is {kind!r}; a charge's first event must be one of {sorted(INITIAL_STATES)}"
        if kind in (PROGRESS, FINISHED):
            if self.state != RUNNING:
                return f"a {kind!r} event while the charge is {self.state!r} (recorded only while running)"
            if self.finished is not None:
                return f"a {kind!r} event after the trainer's finished result"
            key = "steps_done" if kind == PROGRESS else "steps_run"
            steps = _steps(payload, key)
            if steps is None or not self.progress <= steps <= self.planned:
                return f"{kind!r} {key} {payload.get(key)!r} is outside [{self.progress}, {self.planned}] (last progress, reserved)"
            if kind == PROGRESS:
                self.progress = steps
            else:
                self.finished = steps
            return None
        if kind not in TRANSITIONS:
            return None
        allowed = INITIAL_STATES if self.state is None else TRANSITIONS[self.state]
        if kind not in allowed:
            return (f"illegal transition {self.state!r} -> {kind!r} (the state machine allows "
                    f"{sorted(allowed) or 'nothing'} from {self.state!r})")
        if kind == RESERVED:
            if _steps(payload, "steps_planned") is None or not isinstance(payload.get("blocks", []), list):
                return "its reserved event has no valid steps_planned or blocks"
            self.reserved = payload
        elif kind == COMMITTED:
            steps = _steps(payload, "steps_run")
            if steps is None or not self.progress <= steps <= self.planned:
                return f"committed steps_run {payload.get('steps_run')!r} is outside [{self.progress}, {self.planned}] (last progress, reserved)"
            if steps < self.planned and steps != self.finished:
                return (f"committed at {steps} of {self.planned} reserved steps, which needs a finished result of "
                        f"exactly {steps} steps; it has {self.finished}")
            self.steps_run = steps
        elif kind == EXPIRED and created_at < str(self.reserved.get("lease_expires_at", "")):
            return f"expired at {created_at}, before its lease ran out at {self.reserved.get('lease_expires_at')}"
        self.state = kind
        return None


def replay_charge(events: Iterable[tuple[str, dict[str, Any], str]]) -> tuple[ChargeReplay, list[str]]:
    """Replay one charge's events, given as (kind, payload, created_at) in chain order; return the
    replay and the rules broken (one line per offending event)."""
    replay, broken = ChargeReplay(), []
    for kind, payload, created_at in events:
        rule = replay.apply(kind, payload, created_at)
        if rule:
            broken.append(rule)
    return replay, broken


@dataclass
class _Chain:
    """What one dataset's events give, in chain order (built by :func:`_replay_event`)."""

    terms: Optional[DatasetTerms] = None
    blocks: dict[str, BlockTerms] = field(default_factory=dict)
    charges: dict[str, ChargeReplay] = field(default_factory=dict)


def _replay_event(chain: _Chain, seq: int, kind: str, charge_id: Optional[str], body: str, created_at: str) -> Optional[str]:
    """Apply one event to ``chain``; return the problem it shows (without the dataset's name), or None.

    Checks the dataset-level rules at the point the event was appended: one ``registered`` event,
    first; a block's cap never above the dataset's; no block added while a whole-dataset charge
    counts; a charge reads only blocks added before it, and not the whole of a partitioned dataset.
    """
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        return f"event {seq} ({kind}) has a payload that is not a JSON object (edited)"
    if kind == "registered":
        if seq != 1 or chain.terms is not None or charge_id is not None:
            return f"event {seq} registers the dataset again; a dataset is registered once, by its first event"
        try:
            chain.terms = DatasetTerms.from_event(payload)
        except LedgerError as exc:
            return f"event {seq}: {exc} (edited)"
        try:
            _filter(chain.terms.accountant, chain.terms.filter_spec)
        except LedgerError as exc:
            return f"its registered event names {exc}"
        return None
    if kind == "block_added":
        try:
            block = BlockTerms.from_event(payload)
        except LedgerError as exc:
            return f"event {seq}: {exc} (edited)"
        if block.name in chain.blocks:
            return f"event {seq} adds block {block.name!r} again; blocks are append-only"
        chain.blocks[block.name] = block
        if chain.terms is not None and block.epsilon_cap > chain.terms.epsilon_cap:
            return f"block {block.name!r} (event {seq}) has cap {block.epsilon_cap!r}, above the dataset's cap {chain.terms.epsilon_cap!r}"
        whole = sorted(cid for cid, r in chain.charges.items()
                       if r.reserved is not None and not r.reserved.get("blocks") and r.state not in UNCHARGED)
        if whole:
            return (f"block {block.name!r} (event {seq}) was added while whole-dataset charge(s) {', '.join(whole)} count; "
                    "a dataset with whole-dataset spend cannot be partitioned")
        return None
    if charge_id is None:
        if kind in TRANSITIONS or kind in (PROGRESS, FINISHED):
            return f"event {seq} ({kind}) names no charge"
        return None
    replay = chain.charges.setdefault(charge_id, ChargeReplay())
    rule = replay.apply(kind, payload, created_at)
    if rule:
        return f"charge {charge_id}: event {seq} ({kind}) breaks the state machine: {rule} (tampering)"
    if kind == RESERVED:
        blocks = payload.get("blocks") or []
        missing = sorted(set(blocks) - set(chain.blocks))
        if missing:
            return f"charge {charge_id} (event {seq}) reads block(s) {missing} that the chain has not added"
        if chain.blocks and not blocks:
            return f"charge {charge_id} (event {seq}) reads the whole dataset after it was partitioned into blocks"
    return None


def _compare_curve(stored: Optional[str], sigma: float, q: float, f: filters.PrivacyFilter) -> Optional[str]:
    """How a stored one-step RDP curve compares with the one (sigma, q) gives now at the filter's
    orders: None when equal, ``"drift: ..."`` within :data:`CURVE_DRIFT_RTOL`, else what is wrong."""
    try:
        curve = np.asarray(json.loads(stored), dtype=float) if stored is not None else None
    except (ValueError, TypeError):
        return "it is not a list of numbers"
    if curve is None:
        return "it is missing"
    fresh = np.asarray(f.one_step(sigma, q))
    if curve.shape != fresh.shape:
        return f"it has {curve.size} orders, not {fresh.size}"
    if np.array_equal(curve, fresh):
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(curve == fresh, 0.0, np.abs(curve - fresh) / np.abs(fresh))
    rel = np.where(np.isnan(rel), np.inf, rel)  # inf against a finite value, or nan: never drift
    worst = float(np.max(rel))
    if not worst <= CURVE_DRIFT_RTOL:
        return f"relative difference up to {worst:.3g}"
    lower = int(np.sum(curve < fresh))
    return (f"drift: it differs from the recomputed curve by at most {worst:.1e} relative (below {CURVE_DRIFT_RTOL:g}: "
            f"numerical drift such as a library upgrade, not an edit); the stored curve is lower at {lower} of "
            f"{fresh.size} orders; admission counts the stored curve")


def _describe_filter(accountant: Optional[str], spec: Optional[str]) -> str:
    try:
        return _filter(accountant, spec).describe()
    except LedgerError:
        return repr(accountant)
