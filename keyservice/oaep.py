"""EME-OAEP decoding by OpenSSL, for a token that does only the raw RSA step.

SoftHSM 2.6 offers CKM_RSA_PKCS_OAEP with SHA-1 only; for RSA-OAEP-256 the token then
computes c^d mod n (CKM_RSA_X_509) and the padding must be checked here. That check is
where Manger's attack lives, so it is not written in Python: OpenSSL's own
RSA_padding_check_PKCS1_OAEP_mgf1 does it in constant time, the routine its RSA
decryption uses. It is reached through the libcrypto that Python's `_ssl` links (the
way nbdserver/tls.py reaches SSL_CTX calls); `cryptography` has no API for the padding
step alone.
"""

from __future__ import annotations

import ctypes
import functools

_DIGESTS = {"sha1": "EVP_sha1", "sha256": "EVP_sha256"}


class OaepError(Exception):
    """The padding did not check out; deliberately says nothing about why."""


@functools.cache
def _libcrypto():
    import _ssl
    lib = ctypes.CDLL(_ssl.__file__)  # dlsym through it finds the libcrypto _ssl links
    check = lib.RSA_padding_check_PKCS1_OAEP_mgf1
    check.restype = ctypes.c_int
    check.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int,
                      ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    for name in _DIGESTS.values():
        getattr(lib, name).restype = ctypes.c_void_p
        getattr(lib, name).argtypes = []
    lib.ERR_clear_error.restype = None
    lib.ERR_clear_error.argtypes = []
    return lib


def decode(em: bytes, k: int, digest: str) -> bytes:
    """The message inside `em` (c^d mod n of a k-byte modulus), MGF1 and label hash both
    `digest` ("sha1" or "sha256"), empty label. Raises OaepError, one kind for every fault."""
    if len(em) > k:
        raise OaepError()
    em = bytes(k - len(em)) + em  # a token may drop the integer's leading zero bytes
    lib = _libcrypto()
    md = getattr(lib, _DIGESTS[digest])()
    out = ctypes.create_string_buffer(k)
    try:
        n = lib.RSA_padding_check_PKCS1_OAEP_mgf1(out, k, em, k, k, None, 0, md, md)
    finally:
        lib.ERR_clear_error()  # the failure's reason stays out of the thread's error queue
    if n < 0:
        raise OaepError()
    message = out.raw[:n]
    ctypes.memset(out, 0, k)  # the unwrapped DEK is the caller's to keep, not this buffer's
    return message
