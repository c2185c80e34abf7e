"""crypto/double.py: two AES-256-XTS layers per sector, checked against an independent
implementation (`cryptography`'s AES-XTS, one decryption per layer)."""

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdserver.backend import FileBackend
from nbdserver.crypto import SECTOR_SIZE as S
from nbdserver.crypto import InvalidKey, XtsLayer, generate_dek
from nbdserver.crypto.double import DOUBLE_KEY_SIZE, DoubleXtsCipher, join_keys


def xts(key: bytes, sector: int, data: bytes, *, encrypt: bool) -> bytes:
    c = Cipher(algorithms.AES(key), modes.XTS(sector.to_bytes(16, "little")))
    ctx = c.encryptor() if encrypt else c.decryptor()
    return ctx.update(data) + ctx.finalize()


def two_keys():
    platform, customer = generate_dek(), generate_dek()
    return bytes(platform), bytes(customer), join_keys(platform, customer)


def test_join_keys_wipes_both_inputs_and_puts_the_platform_dek_first():
    platform, customer = generate_dek(), generate_dek()
    p, c = bytes(platform), bytes(customer)
    key = join_keys(platform, customer)
    assert bytes(key) == p + c and len(key) == DOUBLE_KEY_SIZE
    assert platform == bytearray(64) and customer == bytearray(64)


def test_join_keys_wipes_both_inputs_when_it_refuses_one():
    """A DEK with equal halves (only a faulty or hostile key service returns one) is
    refused, and the other DEK, unwrapped beside it, is wiped all the same."""
    good, bad = generate_dek(), bytearray(os.urandom(32) * 2)
    with pytest.raises(InvalidKey, match="halves"):
        join_keys(good, bad)
    assert good == bytearray(64) and bad == bytearray(64)
    good, short = generate_dek(), bytearray(os.urandom(48))
    with pytest.raises(InvalidKey):
        join_keys(short, good)
    assert good == bytearray(64) and short == bytearray(48)


def test_each_sector_is_the_customer_layer_over_the_platform_layer():
    p, c, key = two_keys()
    cipher = DoubleXtsCipher(key)
    plain = os.urandom(4 * S)
    buf = bytearray(plain)
    cipher.encrypt(buf, buf, 9)
    for i in range(4):
        sector = bytes(buf[i * S:(i + 1) * S])
        assert sector != plain[i * S:(i + 1) * S]
        inner = xts(c, 9 + i, sector, encrypt=False)
        assert xts(p, 9 + i, inner, encrypt=False) == plain[i * S:(i + 1) * S]
        # One key alone reads nothing.
        assert xts(p, 9 + i, sector, encrypt=False) != plain[i * S:(i + 1) * S]
    out = bytearray(len(buf))
    assert cipher.decrypt(buf, out, 9, holes=True) == 0
    assert out == plain
    cipher.close()


def test_holes_read_as_zeros_through_both_layers():
    _, _, key = two_keys()
    cipher = DoubleXtsCipher(key)
    buf = bytearray(3 * S)
    assert cipher.decrypt(buf, buf, 0, holes=True) == 3
    assert buf == bytearray(3 * S)
    cipher.close()


def test_close_wipes_the_pair():
    _, _, key = two_keys()
    cipher = DoubleXtsCipher(key)
    cipher.close()
    assert cipher.closed and key == bytearray(DOUBLE_KEY_SIZE)


def test_bad_pairs_are_refused():
    dek = generate_dek()
    with pytest.raises(InvalidKey, match="must differ"):
        DoubleXtsCipher(bytearray(bytes(dek) * 2))
    with pytest.raises(InvalidKey, match="128 bytes"):
        DoubleXtsCipher(bytearray(100))
    with pytest.raises(TypeError):
        DoubleXtsCipher(bytes(128))  # type: ignore[arg-type]
    half = bytearray(os.urandom(32) * 2)
    with pytest.raises(InvalidKey, match="halves"):
        DoubleXtsCipher(half + generate_dek())


class _Queue:
    """Records what a layer submits instead of reading it (test_readq.py reads)."""

    def __init__(self):
        self.submitted = []

    def submit(self, *args, **kw):
        self.submitted.append(args)


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_a_layer_keyed_with_two_deks_writes_both_layers_at_any_offset(tmp_path, cache):
    p, c, key = two_keys()
    path = tmp_path / "disk.img"
    try:
        lower = FileBackend(path, size=64 * S, cache=cache)
    except OSError as e:  # a file system without O_DIRECT
        pytest.skip(f"cache={cache}: {e}")
    layer = XtsLayer(lower, key)
    model = bytearray(64 * S)
    writes = [(os.urandom(5 * S + 512), 3 * S + 512), (os.urandom(S), 20 * S),
              (bytearray(os.urandom(16 * S)), 32 * S), (os.urandom(100), 50 * S + 7)]
    for data, off in writes:
        layer.pwrite(memoryview(data), off)
        model[off:off + len(data)] = data
    layer.flush()
    got = bytearray(64 * S)
    layer.pread(memoryview(got), 0)  # 256 KiB: the mapping's path where there is one
    assert got == model
    small = bytearray(S)
    queue = _Queue()
    assert layer.submit_read(queue, small, 20 * S, object()) is True  # both layers, natively
    assert len(queue.submitted) == 1
    layer.close()
    assert key == bytearray(DOUBLE_KEY_SIZE)
    raw = path.read_bytes()
    for s in range(64):
        sector = raw[s * S:(s + 1) * S]
        if sector == bytes(S):
            assert model[s * S:(s + 1) * S] == bytes(S)  # never written: a hole
            continue
        inner = xts(c, s, sector, encrypt=False)
        assert xts(p, s, inner, encrypt=False) == model[s * S:(s + 1) * S], s


def _cryptsetup_unavailable():
    from tests.unit.test_xts_cryptsetup import why_not
    return why_not()


@pytest.mark.root
@pytest.mark.skipif(_cryptsetup_unavailable() is not None, reason=_cryptsetup_unavailable() or "")
def test_cryptsetup_two_stacked_plain_devices_read_the_plaintext(tmp_path):
    """docs/format.md, "Double encryption": the customer DEK's device first, then the
    platform DEK's device over it."""
    import subprocess
    p, c, key = two_keys()
    path = tmp_path / "disk.img"
    layer = XtsLayer(FileBackend(path, size=64 * S), key)
    plain = os.urandom(5 * S + 512)
    layer.pwrite(memoryview(plain), 3 * S + 512)
    layer.flush()
    layer.close()

    name = f"dbltest{os.getpid()}"
    opts = ["--type", "plain", "--readonly", "--cipher", "aes-xts-plain64", "--key-size", "512",
            "--sector-size", "4096", "--iv-large-sectors", "--key-file", "-",
            "--keyfile-size", "64"]
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", str(path)],
                          check=True, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["cryptsetup", "open", *opts, loop, name + "o"], input=c, check=True,
                       capture_output=True)
        try:
            subprocess.run(["cryptsetup", "open", *opts, f"/dev/mapper/{name}o", name],
                           input=p, check=True, capture_output=True)
            try:
                with open(f"/dev/mapper/{name}", "rb") as dev:
                    dev.seek(3 * S + 512)
                    assert dev.read(len(plain)) == plain
            finally:
                subprocess.run(["cryptsetup", "close", name], check=True, capture_output=True)
        finally:
            subprocess.run(["cryptsetup", "close", name + "o"], check=True, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True, capture_output=True)
