"""Loaded models: a model dir verified, its backend started, warmed up and ready for calls."""
