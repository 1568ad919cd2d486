"""One run context per process: one ledger object per workspace, the trained model loaded once."""

from __future__ import annotations

import os

from dpops.ledger.store import Ledger
from dpops.models import hf
from dpops.pipeline import context, stages


def test_the_stages_share_one_ledger_per_workspace_and_a_new_workspace_gets_its_own(workspace_env, tmp_path, monkeypatch):
    opened = []
    real_init = Ledger.__init__

    def counting_init(self, *args, **kwargs):
        opened.append(args[0] if args else kwargs.get("url"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Ledger, "__init__", counting_init)
    first = stages._ledger()
    first.register_dataset(name="d", unit="record", delta=1e-5, epsilon_cap=1.0, contribution_bound=None)
    first.dispose()  # what every stage does when it is done: its connections go back, the ledger stays usable
    again = stages._ledger()
    assert again is first and again.datasets() == ["d"] and len(opened) == 1

    monkeypatch.setenv("DPOPS_HOME", str(tmp_path / "other-home"))
    other = stages._ledger()
    assert other is not first and other.datasets() == [] and len(opened) == 2
    assert context.current().ledger is other


def test_a_trained_model_is_loaded_once_until_its_weights_change(tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(hf, "load", lambda directory: loads.append(directory) or (object(), object(), {"n": len(loads)}))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / hf.WEIGHTS).write_bytes(b"weights")
    ctx = context.RunContext(workspace=context.workspace())
    first = ctx.model(model_dir)
    assert ctx.model(str(model_dir)) is first and len(loads) == 1  # evaluation, then the audit: one load
    (model_dir / hf.WEIGHTS).write_bytes(b"other weights!")
    stat = (model_dir / hf.WEIGHTS).stat()
    os.utime(model_dir / hf.WEIGHTS, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert ctx.model(model_dir) is not first and len(loads) == 2
    ctx.close()
