"""The OpenAI-compatible HTTP API: a transport beside gRPC over the same dataplane."""
