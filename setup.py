"""Native parts only; every other piece of metadata lives in pyproject.toml.

`nbdserver._readq` runs the server's cold reads on native threads that never take the
GIL (no dependencies); `nbdserver._uring` is the same queue on io_uring, through raw
system calls (the kernel's headers only, no liburing). `nbdserver.crypto._xts` is a
thin CPython extension over OpenSSL's EVP AES-256-XTS; it also gives the read queue its
decryption (the protocol between the two is nbdserver/_readq.h). It links, in order of
preference:

- statically, the libcrypto that `scripts/lib/openssl.sh` builds from a pinned OpenSSL
  release (3.2+ has the AVX-512/VAES XTS path, twice the speed of Debian 12's 3.0 here),
  when NBDSERVER_OPENSSL_PREFIX names it. Its symbols stay private to the extension
  (--exclude-libs), so the `ssl` module and `cryptography` keep their own OpenSSL;
- otherwise the system's libcrypto (libssl-dev), dynamically.
"""

import os

from setuptools import Extension, setup

prefix = os.environ.get("NBDSERVER_OPENSSL_PREFIX")
if prefix and os.path.isfile(os.path.join(prefix, "lib", "libcrypto.a")):
    openssl = dict(
        include_dirs=[os.path.join(prefix, "include")],
        extra_objects=[os.path.join(prefix, "lib", "libcrypto.a")],
        libraries=["pthread"],
        extra_link_args=["-Wl,--exclude-libs,ALL", "-Wl,--gc-sections"],
        define_macros=[("NBDSERVER_STATIC_OPENSSL", "1")],
    )
else:
    openssl = dict(libraries=["crypto"])

warnings = ["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

setup(
    ext_modules=[
        Extension(
            "nbdserver._readq",
            sources=["nbdserver/_readq.c"],
            depends=["nbdserver/_readq.h"],
            extra_compile_args=warnings,
            libraries=["pthread"],
        ),
        Extension(
            "nbdserver._cachedio",
            sources=["nbdserver/_cachedio.c"],
            depends=["nbdserver/_readq.h"],
            extra_compile_args=warnings,
        ),
        Extension(
            "nbdserver._uring",
            sources=["nbdserver/_uring.c"],
            depends=["nbdserver/_readq.h"],
            extra_compile_args=warnings,
        ),
        Extension(
            "nbdserver.crypto._xts",
            sources=["nbdserver/crypto/_xts.c"],
            depends=["nbdserver/_readq.h"],
            extra_compile_args=warnings,
            **openssl,
        ),
    ],
)
