"""Canaries of the one-run audit: synthetic records that no real record resembles.

A canary is a string of random letter-words with a random label. Real records never contain such
strings, so a model that trains on a canary without enough noise memorises it, and its loss on
that canary drops; the audit (:func:`dpops.assess.audit.canary_audit`) then guesses which canaries were
trained on. Canaries that look like ordinary records (say, a real sentence with a flipped label)
were measured to catch nothing, not even a noise-free run.

Each canary is included in the training data with probability 1/2, drawn from fresh, unrecorded
randomness at train time. Which ones were included is the auditor's secret: it is kept in the
run directory (:data:`FILE`), never in the dataset. Canaries are not private, so their texts,
per-canary scores and inclusion flags may be logged.

Accounting: the plan counts the canaries in n (records + m), so delta < 1/n is checked for the
largest dataset the run can see; the trainer samples at the planned rate q whatever the number
actually included, and Poisson sampling at q gives the same guarantee for any n.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

#: File name of the canaries and their inclusion flags in a run directory.
FILE = "canaries.json"

_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


@dataclass(frozen=True)
class Canaries:
    """The canaries of one run and which of them were trained on."""

    texts: list[str]
    labels: list[int]
    included: list[bool]

    def training_rows(self) -> pd.DataFrame:
        """The included canaries as rows of a training DataFrame (columns text, label)."""
        keep = np.asarray(self.included, dtype=bool)
        return pd.DataFrame({"text": np.asarray(self.texts, dtype=object)[keep], "label": np.asarray(self.labels)[keep]})

    def all_rows(self) -> pd.DataFrame:
        """Every canary, included or not, as rows to score (columns text, label)."""
        return pd.DataFrame({"text": self.texts, "label": self.labels})

    def save(self, path: Path) -> Path:
        return _write(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "Canaries":
        data = json.loads(Path(path).read_text())
        return cls(texts=list(data["texts"]), labels=[int(x) for x in data["labels"]], included=[bool(x) for x in data["included"]])


def _write(path: Path, data: dict) -> Path:
    """Write a run directory's canary file (JSON), making the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def draw(m: int, *, n_labels: int, seed: int, words: int = 6) -> Canaries:
    """``m`` canaries of ``words`` random letter-words each, with random labels.

    Texts and labels come from ``seed`` (reproducible, not secret); inclusion from fresh
    randomness, so no one but the auditor's file knows which canaries were trained on.

    Raises:
        ValueError: ``m`` below 2 or fewer than 2 labels.
    """
    if m < 2 or n_labels < 2:
        raise ValueError(f"need at least 2 canaries and 2 labels. Found m={m}, n_labels={n_labels}.")
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(m):
        lengths = rng.integers(4, 9, size=words)
        texts.append(" ".join("".join(rng.choice(_LETTERS, size=k)) for k in lengths))
    labels = rng.integers(0, n_labels, size=m).tolist()
    secret = np.random.default_rng(secrets.randbits(128))
    included = (secret.random(m) < 0.5).tolist()
    return Canaries(texts=texts, labels=labels, included=included)


# --------------------------------------------------------------------------- white-box canaries of the DP step

#: File name of the gradient canaries and their inclusion flags in a run directory.
GRADIENT_FILE = "gradient_canaries.json"


@dataclass(frozen=True)
class GradientCanaries:
    """White-box Dirac canaries of the DP step (Andrew et al. 2024; Steinke, Nasr & Jagielski 2023).

    Canary j is the gradient C * e_{k_j}: exactly the clipping bound C at one coordinate k_j of the
    trainable weights (:func:`gradient_coordinates`), zero elsewhere. Each is included with
    probability 1/2 (``included``, fresh randomness: the auditor's secret); at every step each
    included canary is Poisson-sampled at the plan's q, like a record, and when sampled it is
    added to the clipped sum before noise (:class:`dpops.train.canary_probe.GradientCanaryProbe`). The audit
    observes coordinate k_j of every released noisy sum.

    Why it is valid: each canary is one unit of privacy whose gradient has norm exactly C, sampled
    at q like any record and counted in n, so it is a record the mechanism's guarantee covers, and
    the guarantee of the real records is unchanged (Poisson sampling at q gives the same epsilon
    for any dataset of at most n units). The observations are coordinates of the noisy sums that
    DP-SGD releases (the accountant covers every iterate), i.e. post-processing of the DP output.
    Dirac canaries are the worst case for the Gaussian mechanism in a direction of the auditor's
    choosing, and they cost nothing to add.

    ``seed`` is public (the job's seed): it only chooses the coordinates, which the adversary of
    the audit game may know; what it must not know is ``included``.
    """

    count: int
    seed: int
    included: list[bool]

    def __post_init__(self) -> None:
        if self.count < 0 or len(self.included) != self.count:
            raise ValueError(f"gradient canaries: count {self.count} but {len(self.included)} inclusion flags")

    def save(self, path: Path) -> Path:
        return _write(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "GradientCanaries":
        data = json.loads(Path(path).read_text())
        return cls(count=int(data["count"]), seed=int(data["seed"]), included=[bool(x) for x in data["included"]])


def draw_gradient(m: int, *, seed: int) -> GradientCanaries:
    """``m`` Dirac gradient canaries; their coordinates follow from ``seed``, their inclusion
    (probability 1/2 each) from fresh randomness (``secrets``), never from the seed.

    Raises:
        ValueError: ``m`` is negative.
    """
    if m < 0:
        raise ValueError(f"the number of gradient canaries must be at least 0. Found {m}.")
    secret = np.random.default_rng(secrets.randbits(128))
    return GradientCanaries(count=m, seed=seed, included=(secret.random(m) < 0.5).tolist())


#: Mixed into the seed of :func:`gradient_coordinates`, so its stream is not that of :func:`draw`.
_COORDINATE_STREAM = 0x6772_6164  # "grad"


def gradient_coordinates(d: int, m: int, seed: int) -> np.ndarray:
    """The flat indices (int64, length ``m``) of the ``m`` Dirac canaries among ``d`` trainable weights.

    An index counts into the trainable parameters concatenated in the order
    ``[p for p in net.parameters() if p.requires_grad]``, each flattened. Drawn from ``seed``
    (public) without replacement when ``m <= d``, so that canaries do not share a coordinate; with
    replacement otherwise (canaries sharing a coordinate then each add C there).

    Raises:
        ValueError: ``d`` below 1 or ``m`` negative.
    """
    if d < 1 or m < 0:
        raise ValueError(f"need at least 1 trainable weight and 0 or more canaries. Found d={d}, m={m}.")
    rng = np.random.default_rng([seed, _COORDINATE_STREAM])
    if m <= d:
        return rng.choice(d, size=m, replace=False).astype(np.int64)
    return rng.integers(0, d, size=m, dtype=np.int64)
