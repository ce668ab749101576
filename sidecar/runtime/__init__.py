"""Inference backends behind one protocol, the choice of device and provider, and the
interface of the per-model engines."""
