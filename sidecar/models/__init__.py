"""Model dirs, the ground floor: the manifest format, its task and defaults, and preflight."""
