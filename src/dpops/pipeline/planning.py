"""Plan a private run and move its charge through the ledger (stages 3, 4 and 6).

A dataset partitioned into blocks (Sage, Lecuyer et al. 2019; config field ``blocks``) is planned
by :func:`plan_blocks`: the run reads a set of whole blocks, n is their privacy units, and the
reservation names exactly those blocks, each of which must admit the charge on its own filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from dpops.config.schema import DatasetConfig, DPSettings
from dpops.errors import BlockExistsError, BudgetExceededError, ConfigError, DataValidationError
from dpops.ledger.states import Charge
from dpops.ledger.store import Ledger
from dpops.privacy import accounting, filters
from dpops.privacy.accounting import SubsampledGaussian
from dpops.privacy.plan import Plan, sample_rate_for


def filter_for(dataset: DatasetConfig, mechanism: SubsampledGaussian, ledger: Optional[Ledger]) -> filters.PrivacyFilter:
    """The dataset's privacy filter: the one the ``ledger`` registered it with; for a dataset not
    registered yet (or no ledger given), the one registration will fix: the config's
    ``privacy.filter_orders``, else the single order that admits the most runs of ``mechanism``
    (the job's mechanism at its target epsilon) within the cap a run counts against (a block's,
    for a partitioned dataset). Reads only the config and the public record count behind q."""
    registered = ledger.filter_of(dataset.name) if ledger is not None else None
    if registered is not None:
        return registered
    if dataset.privacy.privacy_filter is not None:
        return dataset.privacy.privacy_filter
    cap = dataset.block_cap if dataset.blocks is not None else dataset.privacy.epsilon_cap
    return filters.choose_filter(mechanism, cap=cap, delta=dataset.privacy.delta)


def _filter_dict(f: filters.PrivacyFilter) -> dict[str, Any]:
    return {"name": f.name, "orders": list(f.orders), "delta_shares": list(f.delta_shares)}


def plan(*, dataset: DatasetConfig, dp: DPSettings, n_records: int, ledger: Optional[Ledger] = None) -> Plan:
    """Calibrate the noise multiplier to the job's target epsilon at the dataset's delta.

    With ``dp.fit_to_budget``, the noise is raised further, if needed, so that
    ``planned_runs`` runs like this one still pass the dataset's filter given what the
    ``ledger`` has counted so far. The plan is advisory: ``reserve`` re-checks under the lock.

    Raises:
        ConfigError: delta is not below 1/n, or the sampler is not Poisson.
        BudgetExceededError: with ``fit_to_budget``, no noise level fits the planned runs.
    """
    q, sigma = _calibrated(dataset, dp, n_records)
    f = filter_for(dataset, SubsampledGaussian(sigma, q, dp.steps), ledger)
    runs = None
    if dp.fit_to_budget is not None:
        if ledger is None:
            raise ValueError("fit_to_budget needs the ledger")
        runs = dp.fit_to_budget.planned_runs
        sigma = max(sigma, _fit_sigma(ledger.counted(dataset.name), dataset.privacy.epsilon_cap, dataset=dataset, dp=dp,
                                      sample_rate=q, where=f"dataset {dataset.name!r}", privacy_filter=f))
    return _plan(dataset, dp, n_records=n_records, sample_rate=q, sigma=sigma, runs=runs, privacy_filter=f)


def _calibrated(dataset: DatasetConfig, dp: DPSettings, n_records: int) -> tuple[float, float]:
    """(q, sigma) for n units at the job's target epsilon, after the delta < 1/n and sampler checks."""
    delta = dataset.privacy.delta
    if n_records < 1:
        raise ConfigError(f"dataset {dataset.name!r}: no records to train on")
    if not (delta < 1.0 / n_records):
        raise ConfigError(
            f"dataset {dataset.name!r}: field 'privacy.delta' = {delta} must be below 1/n = {1.0 / n_records:.3g} "
            f"(n = {n_records} records)"
        )
    if dp.sampler != accounting.SAMPLER_POISSON:
        raise ConfigError(f"field 'dp.sampler': only 'poisson' matches the accountant. Found {dp.sampler!r}.")
    q = sample_rate_for(n_records, dp.expected_batch_size)
    return q, accounting.calibrate_noise(target_epsilon=dp.target_epsilon, sample_rate=q, steps=dp.steps, delta=delta)


def _plan(dataset: DatasetConfig, dp: DPSettings, *, n_records: int, sample_rate: float, sigma: float, runs: Optional[int],
          privacy_filter: filters.PrivacyFilter, blocks: Optional[list[str]] = None) -> Plan:
    delta = dataset.privacy.delta
    eps = accounting.epsilon([SubsampledGaussian(sigma, sample_rate, dp.steps)], delta=delta)
    return Plan(
        dataset=dataset.name, n_records=n_records, sample_rate=sample_rate, expected_batch_size=sample_rate * n_records,
        steps=dp.steps, noise_multiplier=sigma, max_grad_norm=dp.max_grad_norm, delta=delta,
        target_epsilon=dp.target_epsilon, epsilon=eps, fitted_runs=runs, blocks=blocks,
        privacy_filter=_filter_dict(privacy_filter),
    )


def _fit_sigma(spent: list[SubsampledGaussian], cap: float, *, dataset: DatasetConfig, dp: DPSettings, sample_rate: float,
               where: str, privacy_filter: filters.PrivacyFilter) -> float:
    """The noise that lets ``dp.fit_to_budget.planned_runs`` runs pass a filter that counts ``spent``."""
    fit = dp.fit_to_budget
    runs, steps, sigma_max = fit.planned_runs, dp.steps, fit.max_noise_multiplier
    try:
        return filters.calibrate_noise_to_filter(
            spent=spent, cap=cap, runs=runs, sample_rate=sample_rate, steps=steps, delta=dataset.privacy.delta,
            sigma_max=sigma_max, privacy_filter=privacy_filter,
        )
    except ValueError:
        left = cap - privacy_filter.epsilon(spent, delta=dataset.privacy.delta)
        raise BudgetExceededError(
            f"{where}: refused. {max(0.0, left):.3f} of cap {cap:g} is left; no noise multiplier up to "
            f"{sigma_max:g} (field 'dp.fit_to_budget.max_noise_multiplier') fits {runs} planned run(s) of {steps} steps "
            "(field 'dp.fit_to_budget.planned_runs'). Nothing was trained."
        ) from None


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Block:
    """One block of a partitioned dataset, as a plan sees it."""

    name: str
    units: int  # privacy units (records, or users) in this data version
    epsilon_cap: float
    registered: bool  # known to the ledger; otherwise `reserve` registers it first


def blocks_in(ledger: Ledger, dataset: DatasetConfig, units: dict[str, int], *, source: str) -> list[Block]:
    """The blocks of one data version: those the ledger knows, oldest first, then new ones in the
    order they first appear in the file (the order ``reserve`` registers them in).

    Args:
        units: each block's privacy units in this data version (``DataRef.blocks``).
        source: the training file, named in errors.

    Raises:
        DataValidationError: a registered block's count changed. A block is a fixed set of
            arrivals and brings no new budget: new arrivals go into a new block.
        ConfigError: a registered block's cap differs from the config's (the ledger decides).
    """
    known = {b.name: b for b in ledger.budget(dataset.name).blocks} if dataset.name in ledger.datasets() else {}
    what = "users" if dataset.unit == "user" else "records"
    for name, n in units.items():
        b = known.get(name)
        if b is None:
            continue
        if b.n_records != n:
            raise DataValidationError(
                f"{source}: block {name!r} of column {dataset.blocks.column!r} holds {n} {what} in this data version, but "
                f"the ledger registered it with {b.n_records}. A block is a fixed set of arrivals; a changed block brings "
                "no new budget, and records removed from it cannot be told apart from records moved to another block. "
                "Put new arrivals in a new block (a new value of the column). Nothing was charged or trained."
            )
        if b.epsilon_cap != dataset.block_cap:
            raise ConfigError(
                f"field 'blocks.epsilon_cap' (or 'privacy.epsilon_cap') gives block {name!r} a cap of "
                f"{dataset.block_cap:g}, but the ledger registered it with cap {b.epsilon_cap:g}. The ledger is the "
                "source of truth; a cap is not changed by editing a config."
            )
    old = [Block(name, units[name], b.epsilon_cap, True) for name, b in known.items() if name in units]
    new = [Block(name, n, dataset.block_cap, False) for name, n in units.items() if name not in known]
    return old + new


def register_blocks(ledger: Ledger, dataset: DatasetConfig, blocks: list[Block]) -> list[str]:
    """Add the blocks the ledger does not know yet, in order, each with n = its privacy units and
    the config's cap; return the names added. A block another run added in between is skipped
    (call :func:`blocks_in` again to check its count)."""
    added = []
    for b in blocks:
        if b.registered:
            continue
        try:
            ledger.add_block(dataset.name, name=b.name, n_records=b.units, epsilon_cap=b.epsilon_cap)
        except BlockExistsError:  # added by another run in between; any other refusal propagates
            continue
        added.append(b.name)
    return added


def _scope(ledger: Ledger, dataset: DatasetConfig, block: Block) -> list[SubsampledGaussian]:
    """What ``block``'s filter counts now. A block not yet registered will count exactly the
    charges that read the whole dataset (they count against every block, present and future)."""
    return ledger.counted(dataset.name, block.name if block.registered else None)


def _admitting(ledger: Ledger, dataset: DatasetConfig, blocks: list[Block], mechanism: SubsampledGaussian,
               privacy_filter: filters.PrivacyFilter) -> set[str]:
    """Names of ``blocks`` that can still admit ``mechanism`` (registered ones: the ledger's
    :meth:`~dpops.ledger.store.Ledger.fresh_blocks`)."""
    fresh = set(ledger.fresh_blocks(dataset.name, mechanism)) if any(b.registered for b in blocks) else set()
    delta = dataset.privacy.delta
    return {
        b.name for b in blocks
        if (b.name in fresh if b.registered
            else privacy_filter.epsilon(_scope(ledger, dataset, b) + [mechanism], delta=delta) <= b.epsilon_cap)
    }


def plan_blocks(
    *, dataset: DatasetConfig, dp: DPSettings, blocks: list[Block], extra_units: int, ledger: Ledger, mode: str
) -> Plan:
    """Plan a run on a dataset partitioned into blocks: which blocks it reads, and its mechanism.

    n = the chosen blocks' privacy units + ``extra_units`` (the audit's canaries); q, sigma and the
    delta < 1/n check follow from that n as in :func:`plan`.

    * ``mode='all'``: every block of this data version. ``reserve`` refuses unless each admits.
    * ``mode='fresh'``: only blocks that can still admit the planned run, oldest first. The
      mechanism depends on n and so on the blocks chosen: starting from every block, blocks that
      cannot admit the mechanism planned for the current choice are dropped and the run is planned
      again, until every block chosen admits it (the choice only shrinks, so this ends; a block once
      dropped is not taken back). No block left: refused.

    With ``dp.fit_to_budget`` the fit is per block: sigma is raised until the planned runs pass
    the filter of every block read, each against its own cap ('fresh' drops a block no sigma up to
    ``max_noise_multiplier`` fits; 'all' refuses).

    The plan reads the ledger without locking; ``reserve`` re-checks every block under the lock.

    Raises:
        BudgetExceededError: no block can take the run ('fresh'), or a block cannot fit the planned
            runs ('all' with ``fit_to_budget``).
        ConfigError: delta is not below 1/n for the blocks chosen.
    """
    if mode not in ("all", "fresh"):
        raise ValueError(f"mode must be 'all' or 'fresh'. Found {mode!r}.")
    if not blocks:
        raise ConfigError(f"dataset {dataset.name!r}: the training split holds no block to train on")
    chosen = list(blocks)
    f = None  # the dataset's filter: fixed by the first choice (every block) if not registered yet
    while True:
        n = sum(b.units for b in chosen) + extra_units
        q, sigma = _calibrated(dataset, dp, n)
        f = f or filter_for(dataset, SubsampledGaussian(sigma, q, dp.steps), ledger)
        keep, runs = chosen, None
        if dp.fit_to_budget is not None:
            runs, fitted = dp.fit_to_budget.planned_runs, {}
            for b in chosen:
                try:
                    fitted[b.name] = _fit_sigma(_scope(ledger, dataset, b), b.epsilon_cap, dataset=dataset, dp=dp,
                                                sample_rate=q, where=f"dataset {dataset.name!r} block {b.name!r}",
                                                privacy_filter=f)
                except BudgetExceededError:
                    if mode == "all":
                        raise
            keep = [b for b in chosen if b.name in fitted]
            sigma = max([sigma, *fitted.values()])
        p = _plan(dataset, dp, n_records=n, sample_rate=q, sigma=sigma, runs=runs, blocks=[b.name for b in chosen],
                  privacy_filter=f)
        if mode == "all":
            return p
        admitting = _admitting(ledger, dataset, keep, p.mechanism, f)
        keep = [b for b in keep if b.name in admitting]
        if len(keep) == len(chosen):
            return p
        if not keep:
            raise BudgetExceededError(_no_fresh_block(ledger, dataset, blocks, p, f))
        chosen = keep


def _no_fresh_block(ledger: Ledger, dataset: DatasetConfig, blocks: list[Block], p: Plan, f: filters.PrivacyFilter,
                    shown: int = 10) -> str:
    delta = dataset.privacy.delta
    spent = [f"block {b.name!r} spent {f.epsilon(_scope(ledger, dataset, b), delta=delta):.3f} of cap "
             f"{b.epsilon_cap:g}" for b in blocks[-shown:]]
    more = f" (and {len(blocks) - shown} older block(s))" if len(blocks) > shown else ""
    fit = (f", noise fitted to {p.fitted_runs} planned run(s) (field 'dp.fit_to_budget')" if p.fitted_runs else "")
    return (
        f"dataset {dataset.name!r}: refused. no block can still admit this run (epsilon {p.epsilon:.3f} at delta "
        f"{delta:g}; sigma {p.noise_multiplier:.3f}, q {p.sample_rate:.3g}, {p.steps} steps{fit}): {'; '.join(spent)}{more}. "
        "Only new arrivals, in a new block, bring new budget. Nothing was trained."
    )


def reserve(
    ledger: Ledger,
    p: Plan,
    *,
    job: str,
    data_version: str,
    flow_run_id: Optional[str] = None,
    code_version: Optional[str] = None,
    user_blocks: Optional[dict[str, str]] = None,
    spec_hash: Optional[str] = None,
) -> Charge:
    """Admit the planned mechanism in one atomic ledger transaction (see :meth:`Ledger.reserve`)."""
    return ledger.reserve(
        dataset=p.dataset, mechanism=p.mechanism, max_grad_norm=p.max_grad_norm, n_records=p.n_records,
        job=job, data_version=data_version, flow_run_id=flow_run_id, code_version=code_version,
        blocks=list(p.blocks) if p.blocks else None, user_blocks=user_blocks, spec_hash=spec_hash,
    )


def settle(ledger: Ledger, charge_id: str, *, steps_run: int) -> Charge:
    """Commit the charge at the steps actually run."""
    return ledger.commit(charge_id, steps_run=steps_run)
