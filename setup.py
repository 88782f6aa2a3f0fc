"""Build script: the package and, as package data, the native sources of ``csrc/``.

``csrc/`` stays at the repository root (a source checkout and an editable install read it there);
wheels and sdists carry it as ``lrtensor_kernels/_csrc``, so that an installed package builds the
native backend on first use exactly as a checkout does (``lrtensor_kernels/kernels/native_build.py``
looks in both places). Nothing is compiled at install time: see ``csrc/README.md`` for why.
"""
from setuptools import find_packages, setup

NATIVE_SOURCES = ["README.md", "lrtensor/**/*.h", "lrtensor/**/*.cpp", "lrtensor/**/*.cuh", "lrtensor/**/*.cu"]

setup(
    packages=find_packages(include=["lrtensor_kernels", "lrtensor_kernels.*"]) + ["lrtensor_kernels._csrc"],
    package_dir={"lrtensor_kernels._csrc": "csrc"},
    package_data={"lrtensor_kernels._csrc": NATIVE_SOURCES},
)
