"""Writes what ``predict`` generated into the run dir: ``completions.jsonl``, one JSON object per prompt
(``index, prompt, completion, tokens, seconds``), appended and flushed after every batch so an interrupted run keeps
what it finished (``callbacks.prediction_writer``)."""
from __future__ import annotations

from typing import Optional

from callbacks.prediction_writer import PredictionWriter

FIELDS = ("index", "prompt", "completion", "tokens", "seconds")


class CompletionWriter(PredictionWriter):
    def __init__(self, filename: str = "completions.jsonl", out_dir: Optional[str] = None):
        super().__init__(filename, out_dir, FIELDS)
