"""Model dirs: the manifest, checksums, preflight checks, loading and warm-up."""
