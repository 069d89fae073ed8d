"""Build of the two C extensions (vmshare.engine._pages: per-page hashing and
comparing; vmshare.sources._readpages: scattered reads); all metadata is in
pyproject.toml. _pages inlines xxhash from Debian's libxxhash-dev (header
only, no link).
"""

from setuptools import Extension, setup

FLAGS = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(ext_modules=[
    Extension("vmshare.engine._pages", sources=["vmshare/engine/_pages.c"],
              extra_compile_args=FLAGS),
    Extension("vmshare.sources._readpages", sources=["vmshare/sources/_readpages.c"],
              extra_compile_args=FLAGS),
])
