"""The ledger's vocabulary and its value objects: pure Python, no database.

A charge's **state** is the last of its events: ``reserved`` (admitted, no data read) -> ``running``
(written before the first private record is read) -> ``committed`` (charged for the steps actually
run), or ``failed_charged`` (the run died after reading data: charged in full); only a ``reserved``
charge may be ``released``, and a lease-expired reservation reads ``expired``
(:data:`TRANSITIONS`). The trainer reads a :class:`Charge` from here without loading the ledger's
store (SQLAlchemy); :mod:`dpops.ledger.store` writes and reads them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from dpops.privacy import filters
from dpops.privacy.accounting import SubsampledGaussian

RESERVED = "reserved"
RUNNING = "running"
COMMITTED = "committed"
FAILED_CHARGED = "failed_charged"
RELEASED = "released"
EXPIRED = "expired"
#: Not a state: a durable bound on the steps a running charge may have taken (see Ledger.record_progress).
PROGRESS = "progress"
#: Not a state: the trainer's own completed result, the steps it ran (see Ledger.record_finished).
FINISHED = "finished"
#: Not a state: the model version a charge trained, written once (see Ledger.bind_model).
MODEL_BOUND = "model_bound"
#: Not a state: the gate's evidence on a charge (task, utility figures, audit verdict), written once.
EVIDENCE = "evidence"
#: Payload fields of a ``model_bound`` event.
BINDING_FIELDS = ("model_name", "model_version", "mlflow_run_id", "artifact_sha256")
#: The utility figures an ``evidence`` event may hold (the gate's policy judges them per task).
EVIDENCE_FIGURES = ("accuracy", "eval_loss", "perplexity")
#: Keys ``annotate`` refuses: the binding's and the evidence's (and ``model``, which old notes used).
GATE_KEYS = frozenset((*BINDING_FIELDS, "model", "task", "audit", *EVIDENCE_FIGURES))

#: Allowed state changes. Anything else raises LedgerError.
TRANSITIONS: dict[str, set[str]] = {
    RESERVED: {RUNNING, RELEASED, EXPIRED},
    RUNNING: {COMMITTED, FAILED_CHARGED},
    COMMITTED: set(),
    FAILED_CHARGED: set(),
    RELEASED: set(),
    EXPIRED: set(),
}

#: States that count nothing: the data was never read.
UNCHARGED = {RELEASED, EXPIRED}

#: Neighbouring relation of Poisson-subsampled DP-SGD accounting: add or remove one unit.
ADD_REMOVE = "add_remove"

GENESIS = "0" * 64

#: A reservation that has not started within this many seconds expires (counts nothing).
DEFAULT_LEASE_SECONDS = 3600.0

#: The largest epsilon cap a dataset may be registered with. A cap above it guarantees nothing a
#: privacy officer could sign off on, and non-finite caps (inf, nan) would disable the filter.
MAX_EPSILON_CAP = 1000.0

#: The largest value of the ledger's Integer columns (steps, record counts, sequence numbers): a
#: 32-bit signed integer on PostgreSQL. The API refuses larger values before any SQL runs.
MAX_INT = 2**31 - 1
#: The width of the ledger's name columns (dataset, block, job, data version: ``String(200)``).
MAX_NAME = 200
#: The width of its id columns (``flow_run_id``, ``code_version``: ``String(100)``).
MAX_ID = 100


# --------------------------------------------------------------------------- value objects


@dataclass(frozen=True)
class Charge:
    """A charge and its current state, as read from the ledger."""

    id: str
    dataset: str
    state: str
    mechanism: SubsampledGaussian
    steps_run: Optional[int]
    max_grad_norm: float
    unit: str
    neighbouring: str
    n_records: int
    job: str
    data_version: str
    flow_run_id: Optional[str]
    code_version: Optional[str]
    created_at: str
    lease_expires_at: str
    mlflow_run_id: Optional[str] = None
    #: Blocks read; empty means the whole dataset (then it counts against every block).
    blocks: tuple[str, ...] = ()
    #: Digest of the run's configs at reservation (:class:`dpops.config.spec.RunSpec`); None for older charges.
    spec_hash: Optional[str] = None

    @property
    def charged(self) -> Optional[SubsampledGaussian]:
        """The mechanism this charge counts as, or None when it counts nothing (released, expired)."""
        if self.state in UNCHARGED:
            return None
        if self.state == COMMITTED and self.steps_run is not None:
            return SubsampledGaussian(self.mechanism.noise_multiplier, self.mechanism.sample_rate, self.steps_run)
        return self.mechanism


@dataclass(frozen=True)
class DatasetBudget:
    name: str
    unit: str
    delta: float
    epsilon_cap: float
    spent: float
    charges: dict[str, int] = field(default_factory=dict)
    #: Tight PLD estimate for the same charges as a fixed sequence: reported, never enforced.
    pld_estimate: Optional[float] = None
    #: Per-block budgets when the dataset is partitioned; ``spent`` is then their maximum.
    blocks: list["BlockBudget"] = field(default_factory=list)
    #: The dataset's privacy filter, fixed at registration (its orders and delta shares).
    privacy_filter: filters.PrivacyFilter = filters.GRID_FILTER
    #: The mechanism of the dataset's last charge (sigma, q, steps planned), if any.
    last_mechanism: Optional[SubsampledGaussian] = None
    #: How many more runs of ``last_mechanism`` the filter admits (partitioned: the most any block admits).
    runs_left: Optional[int] = None

    @property
    def remaining(self) -> float:
        return max(0.0, self.epsilon_cap - self.spent)


@dataclass(frozen=True)
class BlockBudget:
    name: str
    epsilon_cap: float
    n_records: int
    spent: float
    #: How many more runs of the dataset's last mechanism this block admits.
    runs_left: Optional[int] = None

    @property
    def remaining(self) -> float:
        return max(0.0, self.epsilon_cap - self.spent)


@dataclass(frozen=True)
class ChainHead:
    """A dataset's chain head after a write: the seq and hash of its last event (what an anchor signs)."""

    dataset: str
    seq: int
    hash: str

    @property
    def label(self) -> str:
        """``"<dataset>:<seq>:<hash>"``, as the MLflow tags ``dpops.chain_head`` and ``dpops.gate_chain_head`` hold it."""
        return f"{self.dataset}:{self.seq}:{self.hash}"


#: Events after which the ledger writes an anchor (see :mod:`dpops.ledger.anchors`): a charge settled
#: or failed, the gate's evidence, a gate decision.
ANCHORED = frozenset({COMMITTED, FAILED_CHARGED, EVIDENCE, "gate_decision"})


def charge_to_dict(charge: Charge) -> dict[str, Any]:
    d = asdict(charge)
    d["mechanism"] = asdict(charge.mechanism)
    return d
