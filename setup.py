"""Build of the one C extension (vmshare.engine._pages); all metadata is in pyproject.toml.

The extension inlines xxhash from Debian's libxxhash-dev (header only, no link).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "vmshare.engine._pages",
    sources=["vmshare/engine/_pages.c"],
    extra_compile_args=["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)])
