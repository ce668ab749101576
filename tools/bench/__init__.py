"""`make bench`: the sidecar against the in-process ceiling and a naive HTTP baseline."""
