"""Per-task pre- and post-processing: pure functions over numpy arrays."""
