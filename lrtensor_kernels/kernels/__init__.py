"""Fused kernels of the backends other than ``reference``; each module is imported on first use."""
