"""Build script. The package is pure Python today; the CUDA extension of csrc/ joins here
as an optional build step (see csrc/README.md)."""
from setuptools import setup

setup()
