"""The NBD protocol, pure: bytes in, typed events out, replies as bytes (no I/O).

- `constants`: names and numbers from doc/proto.md.
- `handshake`: the fixed-newstyle option phase as a state machine.
- `transmission`: request parsing, request checks and reply encoding.
"""
