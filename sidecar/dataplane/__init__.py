"""Validation, routing a request to a model, deadlines; below transport, above the models."""
