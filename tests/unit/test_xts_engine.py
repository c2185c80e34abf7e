"""The native XTS engine (`nbdserver.crypto._xts`) against `cryptography`, the reference.

Known answers are in test_xts_vectors.py, independent implementations in
test_xts_oracle.py; this module checks the engine's own contract: many sectors per call
with consecutive tweaks, in place and out of place, hole handling, refusals, threads.
"""

import os
import random
import threading

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdserver.crypto import _xts
from nbdserver.crypto._xts import Engine

S = 4096


def reference(key, data, first, unit=S, encrypt=True):
    """One `cryptography` XTS cipher per data unit: slow, obviously right."""
    out = bytearray()
    for i in range(0, len(data), unit):
        tweak = ((first + i // unit) % (1 << 128)).to_bytes(16, "little")
        c = Cipher(algorithms.AES(bytes(key)), modes.XTS(tweak))
        op = c.encryptor() if encrypt else c.decryptor()
        out += op.update(data[i:i + unit]) + op.finalize()
    return bytes(out)


def random_key(rng):
    while True:
        k = rng.randbytes(64)
        if k[:32] != k[32:]:
            return k


CASES = [  # (batch of sectors, first sector)
    (1, 0), (2, 7), (3, 2**32 - 2), (17, 2**32 - 8), (64, 2**63 - 30), (5, 2**63),
    (256, 12345), (9, 2**64 - 4),  # crosses into the tweak's high 64 bits
    (4096, 2**31),
]


@pytest.mark.parametrize("count, first", CASES)
def test_matches_cryptography_out_of_place(count, first):
    rng = random.Random(count * 31 + first)
    key = random_key(rng)
    engine = Engine(key, S)
    plain = rng.randbytes(count * S)
    ct = bytearray(len(plain))
    engine.encrypt(plain, ct, first)
    assert bytes(ct) == reference(key, plain, first)
    back = bytearray(len(plain))
    assert engine.decrypt(ct, back, first) == 0
    assert back == plain


@pytest.mark.parametrize("count, first", CASES[:6])
def test_matches_cryptography_in_place(count, first):
    rng = random.Random(count + first)
    key = random_key(rng)
    engine = Engine(key, S)
    plain = rng.randbytes(count * S)
    buf = bytearray(plain)
    view = memoryview(buf)
    engine.encrypt(view, view, first)
    assert bytes(buf) == reference(key, plain, first)
    engine.decrypt(buf, buf, first)
    assert buf == plain


def test_random_batches_and_offsets_within_a_buffer():
    rng = random.Random(5)
    key = random_key(rng)
    engine = Engine(key, S)
    for _ in range(30):
        count = rng.choice([1, 2, 3, rng.randrange(1, 300)])
        first = rng.choice([rng.randrange(2**20), 2**32 + rng.randrange(-50, 50),
                            2**63 + rng.randrange(-50, 50), rng.randrange(2**64)])
        pad = rng.randrange(0, 3) * 512  # views that start inside a larger buffer
        backing = bytearray(rng.randbytes(count * S + 2 * pad))
        view = memoryview(backing)[pad:pad + count * S]
        plain = bytes(view)
        before = bytes(backing)
        engine.encrypt(view, view, first)
        assert bytes(view) == reference(key, plain, first)
        # Nothing outside the view is touched.
        assert backing[:pad] == before[:pad] and backing[pad + count * S:] == before[pad + count * S:]


def test_one_engine_per_data_unit_size():
    rng = random.Random(9)
    key = random_key(rng)
    for unit in (16, 32, 48, 512, 1000, 4096, 65536):
        data = rng.randbytes(unit * 3)
        out = bytearray(len(data))
        Engine(key, unit).encrypt(data, out, 99)
        assert bytes(out) == reference(key, data, 99, unit)


def test_holes_read_as_zeros_without_decryption():
    rng = random.Random(3)
    key = random_key(rng)
    engine = Engine(key, S)
    plain = rng.randbytes(4 * S)
    ct = bytearray(4 * S)
    engine.encrypt(plain, ct, 10)
    ct[S:2 * S] = bytes(S)  # sector 11 never written: a hole reads back as zeros
    out = bytearray(b"\xee" * 4 * S)
    assert engine.decrypt(ct, out, 10, True) == 1
    assert out[:S] == plain[:S] and out[S:2 * S] == bytes(S) and out[2 * S:] == plain[2 * S:]
    # Without `holes`, a zero sector is decrypted like any other (dm-crypt's view).
    assert engine.decrypt(ct, out, 10) == 0
    assert bytes(out[S:2 * S]) == reference(key, bytes(S), 11, encrypt=False)
    # A sector that is zero except for one byte is real data.
    ct[2 * S - 1] = 1
    assert engine.decrypt(ct, ct, 10, True) == 0


def test_sector_numbers_are_absolute_not_per_call():
    rng = random.Random(4)
    engine = Engine(random_key(rng), S)
    plain = rng.randbytes(8 * S)
    whole = bytearray(8 * S)
    engine.encrypt(plain, whole, 100)
    parts = bytearray(8 * S)
    engine.encrypt(plain[:3 * S], memoryview(parts)[:3 * S], 100)
    engine.encrypt(plain[3 * S:], memoryview(parts)[3 * S:], 103)
    assert parts == whole


def test_concurrent_calls_on_one_engine():
    """Large calls release the GIL; each thread needs its own OpenSSL context."""
    rng = random.Random(6)
    key = random_key(rng)
    engine = Engine(key, S)
    plain = rng.randbytes(64 * S)
    expected = reference(key, plain, 1000)
    errors = []

    def worker():
        for _ in range(20):
            out = bytearray(len(plain))
            engine.encrypt(plain, out, 1000)
            if out != expected:
                errors.append("mismatch")
            engine.decrypt(out, out, 1000)
            if out != plain:
                errors.append("decrypt mismatch")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("key, unit, message", [
    (bytes(63), S, "64 bytes"),
    (b"\x01" * 32 + b"\x01" * 32, S, "halves"),
    (bytes(range(64)), 15, "data_unit_size"),
    (bytes(range(64)), 32 * 1024 * 1024, "data_unit_size"),
])
def test_refuses_bad_keys_and_units(key, unit, message):
    with pytest.raises(ValueError, match=message):
        Engine(key, unit)


def test_refuses_bad_buffers_and_sectors():
    engine = Engine(bytes(range(64)), S)
    buf = bytearray(2 * S)
    with pytest.raises(ValueError, match="whole number"):
        engine.encrypt(bytes(S), bytearray(2 * S), 0)
    with pytest.raises(ValueError, match="whole number"):
        engine.encrypt(bytes(S + 1), bytearray(S + 1), 0)
    with pytest.raises(ValueError, match="overlap"):
        engine.encrypt(memoryview(buf)[:S], memoryview(buf)[512:S + 512], 0)
    with pytest.raises(BufferError):
        engine.encrypt(bytes(S), bytes(S), 0)  # dst must be writable
    with pytest.raises(ValueError, match="2\\*\\*128"):
        engine.encrypt(bytes(S), bytearray(S), -1)
    with pytest.raises(ValueError, match="2\\*\\*128"):
        engine.encrypt(bytes(S), bytearray(S), 2**128)
    with pytest.raises(ValueError, match="2\\*\\*128"):
        engine.encrypt(bytes(2 * S), bytearray(2 * S), 2**128 - 1)
    engine.encrypt(bytes(S), bytearray(S), 2**128 - 1)  # the last tweak is fine
    with pytest.raises(TypeError):
        engine.encrypt(bytes(S), bytearray(S), 1.0)
    with pytest.raises(TypeError):
        engine.encrypt(bytes(S), bytearray(S))
    engine.encrypt(b"", bytearray(), 0)  # nothing to do is not an error


def test_close_frees_and_refuses_further_use():
    engine = Engine(bytes(range(64)), S)
    engine.encrypt(bytes(S), bytearray(S), 0)
    assert not engine.closed
    engine.close()
    engine.close()
    assert engine.closed
    with pytest.raises(ValueError, match="closed"):
        engine.decrypt(bytes(S), bytearray(S), 0)


def test_module_helpers():
    a, b = bytearray(64), bytearray(64)
    _xts.random_into(a)
    _xts.random_into(b)
    assert a != b and a != bytearray(64)
    _xts.wipe(a)
    assert a == bytearray(64)
    assert isinstance(_xts.mlock(b, True), bool)
    _xts.mlock(b, False)
    with pytest.raises(BufferError):
        _xts.wipe(bytes(4))


def test_key_buffer_is_not_retained():
    key = bytearray(os.urandom(64))
    engine = Engine(key, S)
    plain = os.urandom(S)
    ct = bytearray(S)
    engine.encrypt(plain, ct, 1)
    key[:] = bytes(64)  # the engine keyed OpenSSL at construction and kept no pointer
    again = bytearray(S)
    engine.encrypt(plain, again, 1)
    assert again == ct


def test_the_engine_runs_the_openssl_the_bootstrap_built():
    """scripts/lib/openssl.sh builds a pinned libcrypto and exports its prefix; the engine
    must then link it (a silent fallback to the system's would halve its speed)."""
    from nbdserver.crypto import _xts
    prefix = os.environ.get("NBDSERVER_OPENSSL_PREFIX")
    if not prefix:
        pytest.skip(f"no pinned OpenSSL built here (the engine runs {_xts.OPENSSL_VERSION})")
    # openssl-VERSION-fips: the tree holds the FIPS provider too (scripts/lib/openssl.sh)
    version = os.path.basename(prefix.rstrip("/")).removeprefix("openssl-").split("-")[0]
    assert _xts.OPENSSL_STATIC == 1
    assert _xts.OPENSSL_VERSION.startswith(f"OpenSSL {version} "), _xts.OPENSSL_VERSION
