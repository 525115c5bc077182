"""Builds the native modules (metadata is in pyproject.toml): mcs._gsm, the GSM core,
mcs._undo, the undo log, mcs._dict, the SharedDict table,
webcache._fs, the fast path's confined file lookup, webcache._hit, the hit path's chain
walk and checked copy, and webcache._native_loop, the native hit loop."""

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
        "mcs._undo",
        ["mcs/_undo.pyx"],
        include_dirs=["mcs"],
        extra_compile_args=["-O2", "-Wno-unused-function"],
        libraries=["pthread"],
    ),
    Extension(
        "mcs._dict",
        ["mcs/_dict.pyx"],
        include_dirs=["mcs"],
        extra_compile_args=["-O2", "-Wno-unused-function"],
        libraries=["pthread"],
    ),
    Extension(
        "webcache._fs",
        ["webcache/_fs.pyx"],
        extra_compile_args=["-O2"],
    ),
    Extension(
        "webcache._hit",
        ["webcache/_hit.pyx"],
        include_dirs=["mcs"],
        extra_compile_args=["-O2", "-Wno-unused-function"],
    ),
    Extension(
        "webcache._native_loop",
        ["webcache/_native_loop.pyx"],
        include_dirs=["mcs", "webcache"],
        extra_compile_args=["-O2", "-Wno-unused-function"],
        libraries=["pthread"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["."],
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
