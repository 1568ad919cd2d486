"""DP-SGD training: the private step, its clipping modes, user-level batches, several processes.

Reads no ledger store and no tracking server: the pipeline hands it a plan and the running
charge (:class:`dpops.ledger.states.Charge`), and it refuses to run anything else
(:func:`.trainer.authorize`). Never imports SQLAlchemy, MLflow or Prefect (tests/test_architecture.py).
"""

from dpops.train.trainer import TrainResult, authorize, make_private, train

__all__ = [
    "TrainResult",
    "authorize",
    "make_private",
    "train",
]
