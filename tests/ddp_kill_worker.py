"""A training process that dies (tests only): torchrun starts it in place of ``dpops.pipeline.worker``.

Rank 1 SIGKILLs itself right after its first private step, i.e. after the records were read and
trained on: what an out-of-memory kill or a lost node does to a real run.
"""

import os
import signal

from dpops.pipeline import worker as launch
from dpops.train import private_step

_step = private_step.noisy_step


def _dying_step(*args, **kwargs):
    _step(*args, **kwargs)
    if os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":  # only in torchrun's processes: importing this module (pytest collects it) patches nothing
    private_step.noisy_step = _dying_step
    launch.main()
