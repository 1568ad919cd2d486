"""Where models go: MLflow tracking and registry (:mod:`.tracking`, :mod:`.pyfunc`), the gate
that refuses a deployment (:mod:`.gate`), and the serving check (:mod:`.serving`).

The modules are imported on use (``from dpops.registry import gate``), so that one of them does not
load what the others need (the budget report needs no torch, the gate no MLflow client).
"""

__all__ = ["gate", "pyfunc", "serving", "tracking"]
