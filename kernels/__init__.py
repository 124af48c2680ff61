"""Triton kernels and their PyTorch references, installed as ``distpose.kernels``."""
