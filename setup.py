"""Build of the optional C accelerator (lbsync._ctfast); pyproject.toml holds the metadata.

The extension is optional: lbsync runs on its pure-Python codec without it (or with
LBSYNC_NO_ACCEL=1), see docs/kernel.md. ``optional=True``: a machine without a C compiler
still installs; tests/unit/test_ctnetlink_accel.py then fails so CI notices.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "lbsync._ctfast", ["lbsync/_ctfast.c"],
    libraries=["b2"],  # BLAKE2b for the store digests (Debian libb2-dev)
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    optional=True)])
