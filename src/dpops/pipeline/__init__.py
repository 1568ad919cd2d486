"""One private fine-tune, stage by stage: the only library layer that crosses the others.

:mod:`.stages` (preflight, resolve, validate, plan, reserve, train, settle, evaluate, audit),
:mod:`.publish` (record, the gate's decision, promotion, the budget report), :mod:`.context`
(the process's ledger and loaded model),
:mod:`.planning` (the plan a config and the ledger admit), :mod:`.worker` (one torchrun process),
:mod:`.report` (the budget report). Prefect's flows and tasks are thin callers of these.

The modules are imported on use (``from dpops.pipeline import planning``), so that one of them does not
load what the others need (the budget report needs no torch, the gate no MLflow client).
"""

__all__ = ["context", "planning", "publish", "report", "stages", "worker"]
