"""DP-SGD training: the private step, its clipping modes, user-level batches, several processes.

Reads no ledger store and no tracking server: the pipeline hands it a plan and the running
charge (:class:`dpops.ledger.states.Charge`), and it refuses to run anything else
(:func:`.trainer.authorize`). Never imports SQLAlchemy, MLflow or Prefect (tests/test_architecture.py).
"""

from dpops.train.private_step import make_private, register_clipping_mode
from dpops.train.trainer import TrainResult, authorize, train

__all__ = [
    "TrainResult",
    "authorize",
    "make_private",
    "register_clipping_mode",
    "train",
]
