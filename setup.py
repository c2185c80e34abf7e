"""Native parts only; every other piece of metadata lives in pyproject.toml.

`nbdserver.crypto._xts` is a thin CPython extension over the system's OpenSSL 3
(libssl-dev): AES-256-XTS over many 4 KiB sectors per call, keyed once.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nbdserver.crypto._xts",
            sources=["nbdserver/crypto/_xts.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        ),
    ],
)
