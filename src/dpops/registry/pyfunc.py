"""The MLflow flavour of a dpops classifier: a pyfunc that loads the saved adapter and predicts."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import torch

from dpops.models.hf import load, predict_logits


class PyfuncClassifier(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper: input a DataFrame with a ``text`` column, output label and probability."""

    def load_context(self, context):  # no type hints: MLflow would try to infer a schema from them
        self.model, self.tokenizer, self.meta = load(Path(context.artifacts["weights"]))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        texts = list(model_input["text"].astype(str))
        logits = predict_logits(self.model, self.tokenizer, texts, max_length=self.meta["model"]["max_length"])
        probs = torch.softmax(logits, dim=-1)
        idx = probs.argmax(dim=-1)
        return pd.DataFrame(
            {"label": [self.meta["labels"][int(i)] for i in idx], "probability": probs.max(dim=-1).values.numpy()}
        )
