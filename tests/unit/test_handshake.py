"""The pure fixed-newstyle handshake (nbdserver.protocol.handshake), driven in memory."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserver.protocol.constants import (
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_SHUTDOWN,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_TOO_BIG,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
)
from nbdserver.protocol.handshake import (
    Close,
    ExportInfo,
    ExportRefused,
    Handshake,
    Ready,
    Send,
    StartTls,
    State,
    TlsMode,
)

FLAGS = 0x1 | 0x4 | 0x8  # HAS_FLAGS | SEND_FLUSH | SEND_FUA
CLIENT = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES


class Catalog:
    """An in-memory export catalog: `disk` (the default), `other`, and `locked`."""

    exports = {"disk": ExportInfo("disk", 1 << 20, FLAGS, "the disk"),
               "other": ExportInfo("other", 2 << 20, FLAGS)}

    def lookup(self, name):
        if name == "locked":
            raise ExportRefused(NBD_REP_ERR_POLICY, "locked")
        try:
            return self.exports[name or "disk"]
        except KeyError:
            raise ExportRefused(NBD_REP_ERR_UNKNOWN, f"no export {name!r}") from None

    def listing(self):
        return [(i.name, i.description) for i in self.exports.values()]


def opt(option, data=b""):
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def string(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">I", len(b)) + b


def go_data(name="disk", *infos):
    return string(name) + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name, *queries):
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def replies(actions):
    """Parse every Send in `actions` as option replies: [(option, type, data)]."""
    raw = b"".join(a.data for a in actions if isinstance(a, Send))
    out = []
    while raw:
        magic, option, rtype, n = struct.unpack_from(">QIII", raw)
        assert magic == OPTION_REPLY_MAGIC
        out.append((option, rtype, raw[20:20 + n]))
        raw = raw[20 + n:]
    return out


def started(tls_mode=TlsMode.OFF, client=CLIENT):
    h = Handshake(Catalog(), tls_mode=tls_mode)
    assert h.receive(struct.pack(">I", client)) == []
    assert h.state is State.OPTIONS
    return h


def test_greeting():
    magic, ihaveopt, flags = struct.unpack(">QQH", Handshake.greeting())
    assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
    assert flags == NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES


def test_unknown_client_flags_close():
    h = Handshake(Catalog())
    [action] = h.receive(struct.pack(">I", 1 << 7))
    assert isinstance(action, Close) and h.state is State.CLOSED


@pytest.mark.parametrize("client,tail", [(CLIENT, 0), (NBD_FLAG_C_FIXED_NEWSTYLE, 124)])
def test_export_name_reply_with_and_without_no_zeroes(client, tail):
    h = started(client=client)
    actions = h.receive(opt(NBD_OPT_EXPORT_NAME, b"other"))
    send, ready = actions
    assert send.data[:10] == struct.pack(">QH", 2 << 20, FLAGS)
    assert len(send.data) == 10 + tail and send.data[10:] == bytes(tail)
    assert isinstance(ready, Ready) and ready.negotiated.export.name == "other"
    assert h.state is State.DONE


def test_export_name_unknown_closes_without_a_reply():
    h = started()
    assert [type(a) for a in h.receive(opt(NBD_OPT_EXPORT_NAME, b"nope"))] == [Close]


def test_list():
    h = started()
    got = replies(h.receive(opt(NBD_OPT_LIST)))
    assert [r[1] for r in got] == [NBD_REP_SERVER, NBD_REP_SERVER, NBD_REP_ACK]
    n = struct.unpack_from(">I", got[0][2])[0]
    assert got[0][2][4:4 + n] == b"disk" and got[0][2][4 + n:] == b"the disk"
    assert replies(h.receive(opt(NBD_OPT_LIST, b"x")))[0][1] == NBD_REP_ERR_INVALID


def test_info_then_go_with_information_requests():
    h = started()
    got = replies(h.receive(opt(NBD_OPT_INFO, go_data("disk", NBD_INFO_NAME, NBD_INFO_DESCRIPTION,
                                                      NBD_INFO_BLOCK_SIZE))))
    assert h.state is State.OPTIONS  # INFO does not end the handshake
    infos = {struct.unpack_from(">H", d)[0]: d[2:] for _, t, d in got if t == NBD_REP_INFO}
    assert infos[NBD_INFO_EXPORT] == struct.pack(">QH", 1 << 20, FLAGS)
    assert infos[NBD_INFO_NAME] == b"disk"
    assert infos[NBD_INFO_DESCRIPTION] == b"the disk"
    assert infos[NBD_INFO_BLOCK_SIZE] == struct.pack(">III", 512, 4096, 32 << 20)
    assert got[-1][1] == NBD_REP_ACK
    actions = h.receive(opt(NBD_OPT_GO, go_data("")))
    assert replies(actions)[-1][1] == NBD_REP_ACK
    ready = actions[-1]
    assert isinstance(ready, Ready) and ready.negotiated.export.name == "disk"
    assert not ready.negotiated.structured_replies and ready.negotiated.meta_contexts == {}


@pytest.mark.parametrize("options,min_block", [
    ([opt(NBD_OPT_EXPORT_NAME, b"disk")], 1),                       # cannot learn block sizes
    ([opt(NBD_OPT_GO, go_data("disk"))], 1),                        # did not ask for them
    ([opt(NBD_OPT_GO, go_data("disk", NBD_INFO_NAME))], 1),
    ([opt(NBD_OPT_INFO, go_data("disk", NBD_INFO_BLOCK_SIZE)),      # INFO does not commit
      opt(NBD_OPT_GO, go_data("disk"))], 1),
    ([opt(NBD_OPT_GO, go_data("disk", NBD_INFO_BLOCK_SIZE))], 512),  # agreed to the minimum
])
def test_only_a_go_asking_for_block_sizes_binds_the_client_to_them(options, min_block):
    """doc/proto.md, "Size constraints": the server may assume the client keeps the
    constraints only after a GO with an NBD_INFO_BLOCK_SIZE request; otherwise it SHOULD
    serve the default minimum block size of 1."""
    h = started()
    actions = h.receive(b"".join(options))
    ready = actions[-1]
    assert isinstance(ready, Ready)
    assert ready.negotiated.min_block == min_block


@pytest.mark.parametrize("data,err", [
    (go_data("nope"), NBD_REP_ERR_UNKNOWN),
    (go_data("locked"), NBD_REP_ERR_POLICY),
    (string("disk"), NBD_REP_ERR_INVALID),                          # no request count
    (string("disk") + struct.pack(">HH", 2, 1), NBD_REP_ERR_INVALID),  # count too large
    (struct.pack(">I", 99) + b"disk", NBD_REP_ERR_INVALID),          # name past the end
    (string(b"\xc3\x28") + struct.pack(">H", 0), NBD_REP_ERR_INVALID),  # not UTF-8
    (string(b"a\0b") + struct.pack(">H", 0), NBD_REP_ERR_INVALID),     # NUL in a string
])
@pytest.mark.parametrize("option", [NBD_OPT_INFO, NBD_OPT_GO])
def test_info_go_errors_keep_the_handshake_going(option, data, err):
    h = started()
    [(o, t, msg)] = replies(h.receive(opt(option, data)))
    assert (o, t) == (option, err) and msg
    assert h.state is State.OPTIONS
    assert isinstance(h.receive(opt(NBD_OPT_GO, go_data()))[-1], Ready)


def test_structured_reply():
    h = started()
    assert replies(h.receive(opt(NBD_OPT_STRUCTURED_REPLY, b"x")))[0][1] == NBD_REP_ERR_INVALID
    assert replies(h.receive(opt(NBD_OPT_STRUCTURED_REPLY)))[0][1] == NBD_REP_ACK
    assert h.receive(opt(NBD_OPT_GO, go_data()))[-1].negotiated.structured_replies


def test_set_meta_context_needs_structured_replies():
    h = started()
    got = replies(h.receive(opt(NBD_OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation"))))
    assert got[0][1] == NBD_REP_ERR_INVALID


@pytest.mark.parametrize("set_on,go_to,expected", [
    ("disk", "disk", {1: "base:allocation"}),
    ("", "disk", {1: "base:allocation"}),   # "" is the default export, the same disk
    ("disk", "", {1: "base:allocation"}),
    ("other", "disk", {}),                  # contexts were chosen for another export
])
def test_set_meta_context_then_go(set_on, go_to, expected):
    h = started()
    h.receive(opt(NBD_OPT_STRUCTURED_REPLY))
    got = replies(h.receive(opt(NBD_OPT_SET_META_CONTEXT, meta_data(set_on, "base:allocation"))))
    assert [r[1] for r in got] == [NBD_REP_META_CONTEXT, NBD_REP_ACK]
    assert got[0][2] == struct.pack(">I", 1) + b"base:allocation"
    assert h.receive(opt(NBD_OPT_GO, go_data(go_to)))[-1].negotiated.meta_contexts == expected


def test_set_meta_context_unknown_context_and_reset():
    h = started()
    h.receive(opt(NBD_OPT_STRUCTURED_REPLY))
    h.receive(opt(NBD_OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation")))
    got = replies(h.receive(opt(NBD_OPT_SET_META_CONTEXT, meta_data("disk", "qemu:dirty-bitmap:x"))))
    assert [r[1] for r in got] == [NBD_REP_ACK]  # nothing matched: the selection is now empty
    assert h.receive(opt(NBD_OPT_GO, go_data("disk")))[-1].negotiated.meta_contexts == {}


@pytest.mark.parametrize("queries,listed", [((), True), (("base:",), True),
                                            (("base:allocation",), True), (("x:y",), False)])
def test_list_meta_context(queries, listed):
    h = started()  # LIST works without structured replies
    got = replies(h.receive(opt(NBD_OPT_LIST_META_CONTEXT, meta_data("disk", *queries))))
    assert [r[1] for r in got] == ([NBD_REP_META_CONTEXT] if listed else []) + [NBD_REP_ACK]


@pytest.mark.parametrize("data,err", [
    (meta_data("nope", "base:allocation"), NBD_REP_ERR_UNKNOWN),
    (string("disk"), NBD_REP_ERR_INVALID),
    (meta_data("disk", "base:allocation") + b"x", NBD_REP_ERR_INVALID),
    (string("disk") + struct.pack(">I", 3) + string("base:allocation"), NBD_REP_ERR_INVALID),
])
def test_meta_context_errors(data, err):
    h = started()
    h.receive(opt(NBD_OPT_STRUCTURED_REPLY))
    for option in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
        assert [r[1] for r in replies(h.receive(opt(option, data)))] == [err]
    assert h.state is State.OPTIONS


def test_abort_acks_then_closes():
    h = started()
    actions = h.receive(opt(NBD_OPT_ABORT))
    assert replies(actions) == [(NBD_OPT_ABORT, NBD_REP_ACK, b"")]
    assert isinstance(actions[-1], Close) and h.state is State.CLOSED
    with pytest.raises(RuntimeError):
        h.receive(b"more")


def test_unknown_option_is_unsupported():
    h = started()
    [(o, t, msg)] = replies(h.receive(opt(1234, b"payload")))
    assert (o, t) == (1234, NBD_REP_ERR_UNSUP) and msg


def test_bad_option_magic_closes():
    h = started()
    assert isinstance(h.receive(b"X" * 16)[-1], Close)


def test_oversized_option_is_skipped_and_answered_too_big():
    h = started()
    n = MAX_OPTION_LENGTH + 1
    assert h.receive(struct.pack(">QII", IHAVEOPT, NBD_OPT_INFO, n)) == []
    assert h.state is State.SKIPPING
    # The payload arrives in pieces, and is never buffered whole.
    for i in range(0, n - 1000, 4096):
        assert h.receive(b"\xff" * min(4096, n - 1000 - i)) == []
    actions = h.receive(b"\xff" * 1000 + opt(NBD_OPT_LIST))
    got = replies(actions)
    assert got[0][:2] == (NBD_OPT_INFO, NBD_REP_ERR_TOO_BIG)
    assert got[-1][:2] == (NBD_OPT_LIST, NBD_REP_ACK)


def test_oversized_export_name_closes():
    h = started()
    n = MAX_OPTION_LENGTH + 1
    actions = h.receive(struct.pack(">QII", IHAVEOPT, NBD_OPT_EXPORT_NAME, n) + bytes(n))
    assert isinstance(actions[-1], Close)


def test_tls_required():
    h = started(TlsMode.REQUIRED)
    for option, data in ((NBD_OPT_LIST, b""), (NBD_OPT_INFO, go_data()), (NBD_OPT_GO, go_data()),
                         (NBD_OPT_STRUCTURED_REPLY, b"")):
        [(o, t, _)] = replies(h.receive(opt(option, data)))
        assert (o, t) == (option, NBD_REP_ERR_TLS_REQD)
    actions = h.receive(opt(NBD_OPT_STARTTLS))
    assert replies(actions) == [(NBD_OPT_STARTTLS, NBD_REP_ACK, b"")]
    assert isinstance(actions[-1], StartTls) and h.state is State.TLS_PENDING
    h.tls_established()
    ready = h.receive(opt(NBD_OPT_GO, go_data()))[-1]
    assert ready.negotiated.tls
    h2 = started(TlsMode.REQUIRED)
    assert isinstance(h2.receive(opt(NBD_OPT_EXPORT_NAME, b"disk"))[-1], Close)


def test_plaintext_selection_is_forgotten_after_starttls():
    h = started(TlsMode.OPTIONAL)
    h.receive(opt(NBD_OPT_STRUCTURED_REPLY))
    h.receive(opt(NBD_OPT_STARTTLS))
    h.tls_established()
    assert not h.receive(opt(NBD_OPT_GO, go_data()))[-1].negotiated.structured_replies


def test_starttls_refusals():
    assert replies(started().receive(opt(NBD_OPT_STARTTLS)))[0][1] == NBD_REP_ERR_UNSUP
    h = started(TlsMode.OPTIONAL)
    h.receive(opt(NBD_OPT_STARTTLS))
    assert isinstance(h.receive(b"early")[-1], Close)  # bytes before the TLS handshake
    with pytest.raises(RuntimeError):
        started().tls_established()


def test_shutting_down():
    h = started()
    h.shutting_down = True
    assert replies(h.receive(opt(NBD_OPT_GO, go_data())))[0][1] == NBD_REP_ERR_SHUTDOWN
    assert isinstance(h.receive(opt(NBD_OPT_EXPORT_NAME, b"disk"))[-1], Close)


def test_bytes_after_go_are_kept_for_transmission():
    h = started()
    h.receive(opt(NBD_OPT_GO, go_data()) + b"request bytes")
    assert h.state is State.DONE and h.leftover == b"request bytes"


def test_a_go_whose_export_cannot_open_is_answered_and_the_options_go_on():
    """The driver could not open the export the GO selected: the selection's own
    replies are the last `ready.replies` Sends (held back, then dropped), unready()
    answers the GO "not available", and bytes sent after the GO are options again."""
    h = started()
    actions = h.receive(opt(NBD_OPT_LIST) + opt(NBD_OPT_GO, go_data("disk", NBD_INFO_NAME))
                        + opt(NBD_OPT_INFO, go_data("other")))
    ready = actions[-1]
    assert isinstance(ready, Ready) and h.state is State.DONE
    kept = actions[:len(actions) - 1 - ready.replies]
    assert [(o, t) for o, t, _ in replies(kept)] == [
        (NBD_OPT_LIST, NBD_REP_SERVER), (NBD_OPT_LIST, NBD_REP_SERVER), (NBD_OPT_LIST, NBD_REP_ACK)]
    dropped = replies(actions[len(kept):-1])
    assert {o for o, _, _ in dropped} == {NBD_OPT_GO} and dropped[-1][1] == NBD_REP_ACK
    again = h.unready("export 'disk' is not available")
    got = replies(again)
    assert got[0] == (NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, b"export 'disk' is not available")
    assert [(o, t) for o, t, _ in got[1:]][-1] == (NBD_OPT_INFO, NBD_REP_ACK)  # read after it
    assert h.state is State.OPTIONS and h.leftover == b""
    actions = h.receive(opt(NBD_OPT_GO, go_data("other")))  # another choice selects anew
    assert isinstance(actions[-1], Ready) and actions[-1].negotiated.export.name == "other"


def test_an_export_name_whose_export_cannot_open_closes():
    h = started()
    send, ready = h.receive(opt(NBD_OPT_EXPORT_NAME, b"disk"))
    assert ready.replies == 1
    [close] = h.unready("export 'disk' is not available")
    assert isinstance(close, Close) and h.state is State.CLOSED
    with pytest.raises(RuntimeError):
        h.unready("twice")


SESSION = (struct.pack(">I", CLIENT) + opt(NBD_OPT_LIST) + opt(NBD_OPT_INFO, go_data("disk", 3))
           + opt(NBD_OPT_STRUCTURED_REPLY) + opt(NBD_OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation"))
           + opt(4321) + opt(NBD_OPT_GO, go_data("disk")) + b"tail")


def run(h, pieces):
    """Feed pieces until the handshake ends; the actions. Later pieces are not its bytes."""
    actions = []
    for i, p in enumerate(pieces):
        if h.state in (State.DONE, State.CLOSED):
            h.leftover += b"".join(pieces[i:])  # what the server would give the parser
            break
        try:
            actions += h.receive(p)
        except RuntimeError:  # documented: receive() outside the option phase
            assert h.state in (State.TLS_PENDING, State.DONE, State.CLOSED)
            break
    return actions


@given(st.lists(st.integers(1, len(SESSION)), max_size=20))
@settings(max_examples=100, deadline=None)
def test_any_split_of_a_session_gives_the_same_result(cuts):
    whole = Handshake(Catalog()).receive(SESSION)
    points = sorted(set(cuts))
    pieces = [SESSION[a:b] for a, b in zip([0] + points, points + [len(SESSION)], strict=True)]
    h = Handshake(Catalog())
    assert run(h, pieces) == whole
    assert h.leftover == b"tail"


def _check_actions(h, actions):
    for a in actions:
        assert isinstance(a, (Send, StartTls, Ready, Close))
    if any(isinstance(a, Ready) for a in actions):
        assert h.state is State.DONE
    if any(isinstance(a, Close) for a in actions):
        assert h.state is State.CLOSED


@given(st.lists(st.binary(max_size=200), max_size=10), st.sampled_from(list(TlsMode)))
@settings(max_examples=300, deadline=None)
def test_fuzz_random_bytes(chunks, tls_mode):
    h = Handshake(Catalog(), tls_mode=tls_mode)
    _check_actions(h, run(h, chunks))


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_fuzz_mutated_sessions(data):
    raw = bytearray(SESSION)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        how = data.draw(st.integers(0, 2))
        if how == 0:
            raw[pos] = data.draw(st.integers(0, 255))
        elif how == 1:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[pos:pos + data.draw(st.integers(1, 8))]
    tls_mode = data.draw(st.sampled_from(list(TlsMode)))
    h = Handshake(Catalog(), tls_mode=tls_mode)
    actions = run(h, [bytes(raw)])
    _check_actions(h, actions)
    if actions and isinstance(actions[-1], StartTls):
        h.tls_established()
        _check_actions(h, run(h, [bytes(raw)]))
