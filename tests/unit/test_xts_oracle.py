"""The engine against implementations of XTS that share no code with OpenSSL.

- libgcrypt (GnuPG's library, cryptsetup's alternative backend): GCRY_CIPHER_MODE_XTS.
- Nettle (GnuTLS's and qemu's crypto): xts_aes256_encrypt_message.
- The Linux kernel's `xts(aes)` (dm-crypt's own code) through AF_ALG, where the kernel
  offers it; `openssl enc` has no XTS, so it cannot serve.

Each is driven per sector with the dm-crypt plain64 IV, and must agree with the engine
on multi-sector calls. The libraries are loaded with ctypes, in the test only.
"""

import ctypes
import ctypes.util
import random
import socket

import pytest

from nbdserver.crypto._xts import Engine

S = 4096
rng = random.Random(1619)


def plain64(sector):
    return sector.to_bytes(16, "little")


def load(name):
    path = ctypes.util.find_library(name)
    if path is None:
        pytest.skip(f"lib{name} is not installed")
    return ctypes.CDLL(path)


def gcrypt_xts(key, data, first, encrypt=True):
    lib = load("gcrypt")
    lib.gcry_check_version.restype = ctypes.c_char_p
    assert lib.gcry_check_version(None)
    lib.gcry_control(38, 0)  # GCRYCTL_INITIALIZATION_FINISHED
    h = ctypes.c_void_p()
    assert lib.gcry_cipher_open(ctypes.byref(h), 9, 13, 0) == 0  # AES256, MODE_XTS
    try:
        assert lib.gcry_cipher_setkey(h, bytes(key), ctypes.c_size_t(64)) == 0
        out = ctypes.create_string_buffer(len(data))
        op = lib.gcry_cipher_encrypt if encrypt else lib.gcry_cipher_decrypt
        for i in range(0, len(data), S):
            # libgcrypt advances the tweak across calls; each sector starts afresh.
            assert lib.gcry_cipher_setiv(h, plain64(first + i // S), ctypes.c_size_t(16)) == 0
            dst = ctypes.byref(out, i)
            assert op(h, dst, ctypes.c_size_t(S), data[i:i + S], ctypes.c_size_t(S)) == 0
        return out.raw
    finally:
        lib.gcry_cipher_close(h)


def nettle_xts(key, data, first, encrypt=True):
    lib = load("nettle")
    ctx = ctypes.create_string_buffer(1024)  # struct xts_aes256_key is 2 * 240 bytes
    if encrypt:
        lib.nettle_xts_aes256_set_encrypt_key(ctx, bytes(key))
        op = lib.nettle_xts_aes256_encrypt_message
    else:
        lib.nettle_xts_aes256_set_decrypt_key(ctx, bytes(key))
        op = lib.nettle_xts_aes256_decrypt_message
    out = ctypes.create_string_buffer(len(data))
    for i in range(0, len(data), S):
        op(ctx, plain64(first + i // S), ctypes.c_size_t(S), ctypes.byref(out, i), data[i:i + S])
    return out.raw


def afalg_xts(key, data, first, encrypt=True):
    try:
        alg = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0)
        alg.bind(("skcipher", "xts(aes)"))
    except (OSError, AttributeError) as e:
        pytest.skip(f"the kernel offers no xts(aes) over AF_ALG here: {e}")
    with alg:
        alg.setsockopt(socket.SOL_ALG, socket.ALG_SET_KEY, bytes(key))
        out = bytearray()
        op = socket.ALG_OP_ENCRYPT if encrypt else socket.ALG_OP_DECRYPT
        for i in range(0, len(data), S):
            conn, _ = alg.accept()
            with conn:
                conn.sendmsg_afalg([data[i:i + S]], op=op, iv=plain64(first + i // S))
                out += conn.recv(S)
        return bytes(out)


@pytest.mark.parametrize("oracle", [gcrypt_xts, nettle_xts, afalg_xts],
                         ids=["libgcrypt", "nettle", "kernel-af_alg"])
@pytest.mark.parametrize("count, first", [(1, 0), (8, 2**32 - 4), (33, 2**63 - 16),
                                          (3, 2**64 - 2)])
def test_engine_agrees_with_independent_xts(oracle, count, first):
    key = rng.randbytes(64)
    plain = rng.randbytes(count * S)
    engine = Engine(key, S)
    ct = bytearray(len(plain))
    engine.encrypt(plain, ct, first)
    assert bytes(ct) == oracle(key, plain, first)
    assert oracle(key, bytes(ct), first, encrypt=False) == plain
