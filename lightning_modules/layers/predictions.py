"""What ``predict`` returns for the image recipes: one record (a dict) per sample, which
``callbacks.prediction_writer.PredictionWriter`` writes as a CSV row.  Shared by the classifiers and regressors."""
from __future__ import annotations

from typing import List, Optional

import torch


def class_records(logits: torch.Tensor, targets: Optional[torch.Tensor], index: torch.Tensor) -> List[dict]:
    """``index, prediction, probability`` (softmax of the predicted class) and ``target`` when known."""
    probs = torch.softmax(logits.detach().float(), -1)
    conf, pred = probs.max(-1)
    rows = []
    for n, i in enumerate(index.tolist()):
        row = {"index": int(i), "prediction": int(pred[n]), "probability": round(float(conf[n]), 6)}
        if targets is not None:
            row["target"] = int(targets[n])
        rows.append(row)
    return rows


def value_records(values: torch.Tensor, targets: Optional[torch.Tensor], index: torch.Tensor) -> List[dict]:
    """``index, prediction`` and ``target`` (already in the data's units)."""
    rows = []
    for n, i in enumerate(index.tolist()):
        row = {"index": int(i), "prediction": round(float(values[n]), 6)}
        if targets is not None:
            row["target"] = round(float(targets[n]), 6)
        rows.append(row)
    return rows

