"""Builds the native modules (metadata is in pyproject.toml): mcs._gsm, the GSM core, and
webcache._fs, the fast path's confined file lookup."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "mcs._gsm",
        ["mcs/_gsm.pyx"],
        include_dirs=["mcs"],
        extra_compile_args=["-O2", "-Wno-unused-function"],
        libraries=["pthread"],
    ),
    Extension(
        "webcache._fs",
        ["webcache/_fs.pyx"],
        extra_compile_args=["-O2"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["."],
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
