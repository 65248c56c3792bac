"""The one compiled part of feddiff: an optional C extension (see src/feddiff/compress/_copycrc.c).

Everything else is in pyproject.toml. ``optional=True``: where it cannot be built (no C compiler),
feddiff installs without it and the wire frames take the pure path (the same bytes, a little slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("feddiff.compress._copycrc", ["src/feddiff/compress/_copycrc.c"],
                             extra_compile_args=["-O2"], optional=True)])
