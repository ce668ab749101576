"""Turns a checkpoint into a servable model dir: ONNX via optimum, validated against PyTorch.

The serving path never imports this package; it needs torch.
"""
