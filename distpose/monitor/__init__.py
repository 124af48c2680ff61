"""Prometheus metrics of training runs (see metrics.py)."""
