"""Inference backends behind one protocol, and the choice of device and provider."""
