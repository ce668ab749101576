"""Scheduling: one bounded, cancellable queue per model, cut into token-budget batches."""
