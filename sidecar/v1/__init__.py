"""Generated from proto/sidecar/v1 by `make proto`. Do not edit."""
