"""Routing a request to a model and its engine, the call envelope, admission and request
limits; below the transports, above the loaded models."""
