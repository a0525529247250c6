"""The one compiled module: the fast path of record encoding (``ctrkit.data.encode.Encoder.encode_records``).

It is optional: where no C compiler is present the install goes on without it and the reference path serves.
Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("ctrkit.data._records", ["src/ctrkit/data/_records.c"], extra_compile_args=["-O3"],
                             optional=True)])
