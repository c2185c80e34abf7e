"""FilterBackend (nbdserver.backend): a layer that forwards what it does not change, and
declines the side channels of a data path it does change."""

from __future__ import annotations

import errno
import inspect

import pytest

from nbdserver.backend import BlockBackend, Extent, FileBackend, FilterBackend
from nbdserver.crypto import XtsLayer, generate_dek

SIZE = 1 << 20


def interface() -> list[str]:
    """Every public member of the interface: a method added to BlockBackend lands here."""
    return [n for n in dir(BlockBackend) if not n.startswith("_")]


class Recorder(BlockBackend):
    """Answers every member with its own sentinel and records how each was called."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.answers = {n: object() for n in interface()}


def _recording(name):
    sig = inspect.signature(getattr(BlockBackend, name))

    def method(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        self.calls.append((name, {k: v for k, v in bound.arguments.items() if k != "self"}))
        return self.answers[name]
    return method


def _answer(name):
    return property(lambda self: self.answers[name])


for _name in interface():
    if isinstance(inspect.getattr_static(BlockBackend, _name), property):
        setattr(Recorder, _name, _answer(_name))
    else:
        setattr(Recorder, _name, _recording(_name))
Recorder.__abstractmethods__ = frozenset()


@pytest.mark.parametrize("name", interface())
def test_a_filter_that_changes_nothing_forwards_every_member(name):
    lower = Recorder()
    layer = FilterBackend(lower)
    if isinstance(inspect.getattr_static(BlockBackend, name), property):
        assert getattr(layer, name) is lower.answers[name]
        return
    sig = inspect.signature(getattr(BlockBackend, name))
    args, kwargs = [], {}
    for p in list(sig.parameters.values())[1:]:  # a distinct object per parameter
        if p.kind is p.KEYWORD_ONLY:
            kwargs[p.name] = object()
        else:
            args.append(object())
    result = getattr(layer, name)(*args, **kwargs)
    if sig.return_annotation not in ("None", None):  # the lower layer's answer, as it is
        assert result is lower.answers[name]
    expected = sig.bind(None, *args, **kwargs).arguments
    expected.pop(next(iter(sig.parameters)))
    assert lower.calls == [(name, dict(expected))]


@pytest.fixture
def disk(tmp_path):
    b = FileBackend(tmp_path / "disk.img", size=SIZE)
    yield b
    b.close()


def xor(data) -> bytes:
    return bytes(b ^ 0x5A for b in data)


class Scrambled(FilterBackend):
    """A layer that changes the data both ways and defines none of the side channels."""

    def pread(self, buf, offset, *, nowait=False):
        self.lower.pread(buf, offset, nowait=nowait)
        buf[:] = xor(buf)

    def pwrite(self, data, offset, *, fua=False, nowait=False, owned=False):
        self.lower.pwrite(memoryview(xor(data)), offset, fua=fua, nowait=nowait)


def read(b, offset, n) -> bytes:
    buf = bytearray(n)
    b.pread(memoryview(buf), offset)
    return bytes(buf)


def test_a_layer_that_changes_the_data_declines_the_channels_below(disk):
    # Below, every channel is on offer: passed through, each would bypass the layer.
    assert disk.native_write(4096) is not None and disk.native_read(4096) is not None
    assert disk.mapping() is not None and disk.stage_write(0, 1 << 16) is None
    layer = Scrambled(disk)
    assert layer.native_write(4096) is None
    assert layer.native_read(4096) is None
    assert layer.mapping() is None
    assert layer.stage_write(0, 1 << 16) is None
    assert layer.submit_read(object(), bytearray(4096), 0, object()) is False
    assert layer.block_status(4096, 8192) == [Extent(8192)]  # data: true whatever it does
    # What always holds passes through.
    assert (layer.size, layer.capabilities, layer.io_align) == (disk.size, disk.capabilities, 0)


def test_zeroing_through_a_changing_layer_writes_its_zeros(disk):
    layer = Scrambled(disk)
    layer.pwrite(memoryview(b"x" * 8192), 0)
    layer.zero(1000, 5000)
    assert read(layer, 0, 8192) == b"x" * 1000 + bytes(5000) + b"x" * 2192
    assert read(disk, 1000, 5000) == b"\x5a" * 5000  # went through the layer's pwrite
    with pytest.raises(OSError) as e:
        layer.zero(0, 4096, fast=True)
    assert e.value.errno == errno.ENOTSUP


def test_trim_through_a_changing_layer_touches_nothing_below(disk):
    layer = Scrambled(disk)
    layer.pwrite(memoryview(b"y" * 4096), 0)
    layer.trim(0, 4096)  # a trimmed range may read as anything: here, what it was
    assert read(layer, 0, 4096) == b"y" * 4096


class ReadsOnly(FilterBackend):
    """Changes reads only: the write channels still speak for its writes."""

    def pread(self, buf, offset, *, nowait=False):
        self.lower.pread(buf, offset, nowait=nowait)


def test_only_the_channels_of_the_changed_path_decline(disk):
    layer = ReadsOnly(disk)
    assert layer.native_write(4096) == disk.native_write(4096)
    assert layer.native_read(4096) is None and layer.mapping() is None


class Counting(FilterBackend):
    """Changes pwrite without changing the data, and says so by naming the channel."""

    native_write = FilterBackend.native_write

    def __init__(self, lower):
        super().__init__(lower)
        self.writes = 0

    def pwrite(self, data, offset, *, fua=False, nowait=False, owned=False):
        self.writes += 1
        self.lower.pwrite(data, offset, fua=fua, nowait=nowait, owned=owned)


def test_a_channel_named_in_the_class_is_kept(disk):
    layer = Counting(disk)
    assert layer.native_write(4096) == disk.native_write(4096)
    assert layer.stage_write(0, 1 << 16) is None  # not named: declined


class Mapped(FilterBackend):
    def pread(self, buf, offset, *, nowait=False):
        self.lower.pread(buf, offset, nowait=nowait)

    def mapping(self):
        return self.lower.mapping()


class RemappedAgain(Mapped):
    def pread(self, buf, offset, *, nowait=False):
        super().pread(buf, offset, nowait=nowait)


class Inherits(Mapped):
    pass


def test_a_subclass_that_changes_reads_again_loses_its_bases_channel(disk):
    assert Mapped(disk).mapping() is not None
    assert Inherits(disk).mapping() is not None  # the same reads: the same channel
    assert RemappedAgain(disk).mapping() is None


def test_xts_layer_offers_no_channel_of_the_file_below(disk):
    layer = XtsLayer(disk, generate_dek())
    try:
        assert layer.native_write(4096) is None
        assert layer.native_read(4096) is None
        assert layer.mapping() is None
        assert layer.lower is disk
    finally:
        layer.close()
