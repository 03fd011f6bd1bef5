"""Importance estimation: which heads, neurons, channels and layers matter."""
from slimlm.importance.scores import ImportanceScores, model_fingerprint

__all__ = ["ImportanceScores", "model_fingerprint"]
