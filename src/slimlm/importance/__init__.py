"""Importance estimation: which heads, neurons, channels and layers matter."""
from slimlm.fingerprint import model_fingerprint
from slimlm.importance.estimate import estimate_importance
from slimlm.importance.scores import ImportanceScores

__all__ = ["ImportanceScores", "estimate_importance", "model_fingerprint"]
