"""User-level DP-SGD: Poisson sampling of users, one clipped contribution per user.

With unit of privacy 'user', neighbouring datasets differ by *all* the records of one user. DP-SGD
then needs two changes to make its guarantee about users instead of records:

* **Sampling** draws users, not records: each user joins a step's batch independently with
  probability q (Poisson), and brings all of their records. The accountant's n and q are about
  users (q = 1 / ceil(n_users / B) with B the expected number of users per batch).
* **Clipping** bounds a user's whole influence: the per-record gradients of one user are summed
  first, and that sum is clipped to C. Opacus's :class:`~opacus.optimizers.DPOptimizer` clips
  each row of ``p.grad_sample``; :func:`sum_grad_samples_by_user` makes each row one user
  before the optimizer step, so the optimizer clips, sums and noises exactly one contribution per
  user, and divides by the expected number of users.

Nothing else changes: the noise multiplier, the steps and the accountant are those of the plan.
Before training, :func:`bound_contributions` keeps at most the dataset's ``contribution_bound``
records of each user (a 1-stable transformation, so it costs nothing and needs no refusal).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from dpops.data.source import LABEL, TEXT, USER
from dpops.errors import PrivacyError


def units(df: pd.DataFrame) -> int:
    """Number of privacy units in a split: users when it has a ``user`` column, else records.

    >>> df = pd.DataFrame({"user": ["a", "a", "b"], "label": [0, 1, 1], "text": ["p", "q", "r"]})
    >>> units(df), units(df.drop(columns="user"))
    (2, 3)
    """
    return int(df[USER].nunique()) if USER in df.columns else len(df)


#: Bytes of the key that chooses each user's kept records (:func:`bound_contributions`).
SUBSET_KEY_BYTES = 32


def new_subset_key() -> bytes:
    """Fresh randomness for one run's :func:`bound_contributions` (``secrets``, never a seed)."""
    return secrets.token_bytes(SUBSET_KEY_BYTES)


def bound_contributions(df: pd.DataFrame, bound: int, key: bytes) -> pd.DataFrame:
    """Keep a uniformly random subset of at most ``bound`` records of each user; the rest are dropped.

    Each record is ranked by a keyed hash (BLAKE2b under ``key``) of its user, label and text, and
    a user's ``bound`` lowest-ranked records are kept. With ``key`` fresh (:func:`new_subset_key`)
    the ranking of one user's records is a uniformly random order, so the kept ones are a uniformly
    random subset of that size; rows keep their order in ``df``.

    Why this costs no privacy: which records of a user are kept depends on that user's own records
    and the key only, never on another user's records or on row positions. Adding or removing one
    user (all of their records: the user-level neighbours) therefore adds or removes only that
    user's kept records, for every key: the transformation is 1-stable, so DP-SGD on its output is
    (epsilon, delta)-DP with respect to the original data with the same figures. Every user keeps
    at least one record, so n (users), the accountant's n and the ledger's, is unchanged. Unlike a
    check that refuses the whole dataset when one user has too many records, nothing here is
    released: a user above the bound changes only what that user's clipped gradient is made of.

    >>> df = pd.DataFrame({"user": ["a", "a", "a", "b"], "label": [0, 1, 0, 1], "text": ["w", "x", "y", "z"]})
    >>> kept = bound_contributions(df, 2, key=bytes(32))
    >>> kept["user"].value_counts().to_dict(), units(kept) == units(df)
    ({'a': 2, 'b': 1}, True)
    """
    if bound < 1:
        raise ValueError(f"contribution bound must be at least 1. Found {bound}.")

    def rank(user: object, label: object, text: object) -> bytes:
        return hashlib.blake2b(f"{user}\x00{label}\x00{text}".encode("utf-8"), key=key, digest_size=16).digest()

    ranks = pd.Series([rank(u, y, t) for u, y, t in zip(df[USER], df[LABEL], df[TEXT], strict=True)], index=df.index)
    order = ranks.sort_values(kind="stable").index
    kept = df.loc[order].groupby(USER, sort=False, dropna=False).cumcount() < bound
    return df[kept.reindex(df.index).to_numpy()].reset_index(drop=True)


def group_rows(user_ids: Sequence) -> list[torch.Tensor]:
    """Row indices of each user, users in order of first appearance.

    >>> [g.tolist() for g in group_rows(["b", "a", "b"])]
    [[0, 2], [1]]
    """
    codes, _ = pd.factorize(pd.Series(list(user_ids)), sort=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes))[:-1]
    return [torch.as_tensor(rows, dtype=torch.long) for rows in np.split(order, bounds)]


class UserBatches:
    """Poisson batches of users, flattened into their records.

    Iterating yields, per step, the tensors of ``dataset`` restricted to the sampled users' rows:
    the same tuples a record-level loader yields, so the training loop does not change. After each
    batch, :attr:`row_user` gives each row's position among that batch's users and
    :attr:`batch_users` the number of users, for :meth:`merge_grad_samples`.
    """

    def __init__(self, dataset: TensorDataset, user_ids: Sequence, *, sample_rate: float, generator: torch.Generator):
        from opacus.data_loader import DPDataLoader
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        self.dataset = dataset
        self.groups = group_rows(user_ids)
        self.loader = DPDataLoader(TensorDataset(torch.arange(len(self.groups))), sample_rate=sample_rate, generator=generator)
        sampler = self.loader.batch_sampler
        if not isinstance(sampler, UniformWithReplacementSampler) or sampler.sample_rate != sample_rate:
            raise PrivacyError(
                f"the user loader samples with {type(sampler).__name__} at rate {getattr(sampler, 'sample_rate', None)}, "
                f"but the accountant assumes Poisson sampling of users at q = {sample_rate}"
            )
        self.row_user = torch.zeros(0, dtype=torch.long)
        self.batch_users = 0

    @property
    def sample_rate(self) -> float:
        """The rate users are Poisson-sampled at, read from the sampler that draws them."""
        return float(self.loader.batch_sampler.sample_rate)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for (sampled,) in self.loader:
            rows = [self.groups[int(u)] for u in sampled]
            self.batch_users = len(rows)
            self.row_user = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(r) for r in rows], dtype=torch.long))
            index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
            yield tuple(t[index] for t in self.dataset.tensors)

    def merge_grad_samples(self, params: Iterable[torch.Tensor]) -> None:
        """Call between ``backward()`` and ``optimizer.step()``: one gradient row per user."""
        sum_grad_samples_by_user(params, self.row_user, self.batch_users)


def sum_grad_samples_by_user(params: Iterable[torch.Tensor], row_user: torch.Tensor, n_users: int) -> None:
    """Replace each parameter's per-record ``grad_sample`` [rows, ...] by per-user sums [n_users, ...].

    Opacus (``loss_reduction="mean"``) stores in row i the gradient of record i's own loss, so the
    sum over a user's rows is the gradient of that user's total loss: the contribution to clip.
    """
    for p in params:
        per_record = p.grad_sample
        if isinstance(per_record, list):  # gradients of several forward passes: not a single batch
            raise PrivacyError("per-user clipping needs one forward/backward pass per step")
        if per_record.shape[0] != row_user.shape[0]:
            raise PrivacyError(f"grad_sample has {per_record.shape[0]} rows but the batch has {row_user.shape[0]} records")
        p.grad_sample = per_record.new_zeros((n_users, *per_record.shape[1:])).index_add_(0, row_user, per_record)
