"""What a trained model shows: canaries, the privacy audit, evaluation, pooled audit evidence.

The modules are imported on use (``from dpops.assess import audit``), so that one of them does not
load what the others need (the budget report needs no torch, the gate no MLflow client).
"""

__all__ = ["audit", "audit_report", "bounds", "canaries", "evaluation", "pooling"]
