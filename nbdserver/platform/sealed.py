"""The backend of a locked disk: it has a size and refuses everything else.

A locked export never calls its backend (the server fails requests with EIO first); this
stands in for the wiped XtsLayer so that nothing could ever reach the ciphertext file
without the key, not even through a bug.
"""

import errno

from ..backend import BlockBackend, Capabilities


class SealedBackend(BlockBackend):
    def __init__(self, size: int):
        self._size = size

    @property
    def size(self):
        return self._size

    @property
    def capabilities(self):
        return Capabilities()

    def _refuse(self, *args, **kwargs):
        raise OSError(errno.EIO, "disk is locked: its key is not available")

    pread = pwrite = flush = trim = zero = block_status = cache = _refuse

    def close(self):
        pass
