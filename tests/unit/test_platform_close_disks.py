"""A revocation locks every disk of a key before anything else (platform/serving.py,
`DiskServing.close_disks`): no garbage collection runs between two of those locks, as a
full one would hold the later disks open for its whole pause."""

from __future__ import annotations

import asyncio
import gc

from nbdserver.backend import FileBackend
from nbdserver.exports import Export, ExportCatalog
from nbdserver.platform.sealed import SealedBackend
from nbdserver.platform.serving import DiskServing

DISKS = 200


def test_no_garbage_collection_runs_among_a_revocations_locks(tmp_path, monkeypatch):
    events: list[str] = []
    real_lock = Export.lock

    def lock(self, reason):
        events.append("lock")
        real_lock(self, reason)

    def collected(phase, info):
        if phase == "start":
            events.append("gc")

    async def main():
        catalog = ExportCatalog()
        serving = DiskServing(None, catalog, None, None)  # type: ignore[arg-type]  # closing only
        names = []
        for i in range(DISKS):  # every fourth attached (an open file), the rest not
            backend = (FileBackend(tmp_path / f"d{i}.img", size=1 << 20) if i % 4 == 0
                       else SealedBackend(1 << 20))
            catalog.add(Export(f"d{i}", backend))
            names.append(f"d{i}")
        monkeypatch.setattr(Export, "lock", lock)
        threshold = gc.get_threshold()
        gc.set_threshold(1, 1, 1)  # a collection at almost every allocation
        gc.callbacks.append(collected)
        try:
            closes = serving.close_disks(names, "key access revoked")
        finally:
            gc.callbacks.remove(collected)
            gc.set_threshold(*threshold)
        assert all(catalog.get(n).locked for n in names)
        assert len(closes) == DISKS // 4  # the attached ones drain, flush and close
        await asyncio.gather(*closes)
        return names

    asyncio.run(main())
    assert gc.isenabled()
    first, last = events.index("lock"), len(events) - 1 - events[::-1].index("lock")
    assert events.count("lock") == DISKS
    assert "gc" not in events[first:last], events[first:last].count("gc")
