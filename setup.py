"""Builds the one native module, mcs._gsm, from mcs/_gsm.pyx (metadata is in pyproject.toml)."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "mcs._gsm",
        ["mcs/_gsm.pyx"],
        include_dirs=["mcs"],
        extra_compile_args=["-O2", "-Wno-unused-function"],
        libraries=["pthread"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["."],
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
