"""SectorLocks: which stripes a sector range takes, in which order."""

import os
import threading

from nbdserver.crypto.sector_locks import SectorLocks


def indices(locks, held):
    return [locks._locks.index(lock) for lock in held]


def test_stripes_of_a_range_ascending_and_held():
    locks = SectorLocks(stripes=8, sectors_per_stripe=4)
    held = locks.acquire(5, 6)  # one sector: one stripe
    assert indices(locks, held) == [1] and all(lock.locked() for lock in held)
    locks.release(held)
    assert not any(lock is not None and lock.locked() for lock in locks._locks)
    held = locks.acquire(3, 13)  # sectors 3..12: stripes 0, 1, 2, 3
    assert indices(locks, held) == [0, 1, 2, 3]
    locks.release(held)


def test_wrapping_range_is_still_taken_in_ascending_order():
    locks = SectorLocks(stripes=8, sectors_per_stripe=4)
    held = locks.acquire(6 * 4, 10 * 4)  # stripe groups 6..9 -> indices 6, 7, 0, 1
    assert indices(locks, held) == [0, 1, 6, 7]
    locks.release(held)


def test_a_range_over_every_stripe_takes_them_all():
    locks = SectorLocks(stripes=8, sectors_per_stripe=4)
    held = locks.acquire(3, 3 + 8 * 4)
    assert indices(locks, held) == list(range(8))
    locks.release(held)


def test_sectors_of_one_stripe_share_a_lock_and_others_do_not():
    locks = SectorLocks(stripes=8, sectors_per_stripe=4)
    held = locks.acquire(0, 1)
    assert locks.acquire.__self__._locks[0] is held[0]
    # A writer of sector 2 (same stripe) would wait; one of sector 4 (next stripe) not.
    assert not held[0].acquire(blocking=False)
    nxt = locks.acquire(4, 5)
    assert indices(locks, nxt) == [1]
    locks.release(nxt)
    locks.release(held)
    again = locks.acquire(2, 3)
    assert again == held
    locks.release(again)


def test_without_blocking_a_busy_stripe_gives_none_and_leaves_nothing_held():
    locks = SectorLocks(stripes=8, sectors_per_stripe=4)
    busy = locks.acquire(8, 9)  # stripe 2
    assert locks.acquire(0, 16, blocking=False) is None  # stripes 0..3: 2 is taken
    assert [lock is not None and lock.locked() for lock in locks._locks] == [False, False, True] + [False] * 5
    locks.release(busy)
    held = locks.acquire(0, 16, blocking=False)
    assert indices(locks, held) == [0, 1, 2, 3]
    locks.release(held)


def test_a_stripe_lock_is_made_on_first_use_and_only_once():
    """An open disk holds no lock objects until it is written (issue 22: an attached,
    idle disk must cost little); threads that race for a new stripe share one lock."""
    locks = SectorLocks(stripes=8, sectors_per_stripe=4)
    assert locks._locks == [None] * 8
    got: list = []
    start = threading.Barrier(8)

    def take():
        start.wait()
        got.append(locks.stripe(5))
    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(lock) for lock in got}) == 1 and locks._locks[5] is got[0]
    assert sum(lock is not None for lock in locks._locks) == 1


def test_the_file_range_orders_two_open_files_of_one_disk(tmp_path):
    """Two opens of one file stand for two processes (OFD locks belong to the open file):
    a range one holds is refused to the other, a disjoint range is not, and the range
    comes free with its release."""
    path = tmp_path / "disk"
    path.write_bytes(bytes(1 << 16))
    fd1, fd2 = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    try:
        a = SectorLocks(stripes=8, sectors_per_stripe=4, file_fd=fd1)
        b = SectorLocks(stripes=8, sectors_per_stripe=4, file_fd=fd2)
        held = a.acquire(5, 6)
        assert b.acquire(5, 6, blocking=False) is None
        assert not any(lock is not None and lock.locked() for lock in b._locks), \
            "a refused file range must leave no stripe of the other held"
        other = b.acquire(6, 7, blocking=False)  # same stripe index, another sector
        assert other is not None
        b.release(other)
        a.release(held)
        again = b.acquire(5, 6, blocking=False)
        assert again is not None
        b.release(again)
    finally:
        os.close(fd1)
        os.close(fd2)


def test_a_file_range_is_not_taken_against_its_own_open_file(tmp_path):
    """Threads of one process share the open file: the stripe locks order them, and the
    file range never makes one wait for the other (nor deadlock on a merged range)."""
    path = tmp_path / "disk"
    path.write_bytes(bytes(1 << 16))
    fd = os.open(path, os.O_RDWR)
    try:
        locks = SectorLocks(stripes=8, sectors_per_stripe=4, file_fd=fd)
        first = locks.acquire(0, 4)  # stripe 0
        second = locks.acquire(4, 8, blocking=False)  # stripe 1, adjacent range
        assert second is not None
        locks.release(first)
        locks.release(second)
    finally:
        os.close(fd)


def test_single_is_the_one_stripe_lock_that_acquire_takes_and_none_across_stripes():
    locks = SectorLocks(stripes=8, sectors_per_stripe=4)
    lock = locks.single(9, 12)  # sectors 9..11: stripe 2, made on this first use
    assert lock is not None and locks._locks[2] is lock
    assert locks.single(8, 12) is lock  # the same lock for any sectors of the stripe
    assert locks.single(11, 13) is None  # sectors 11..12 span stripes 2 and 3
    assert locks.single(8 + 8 * 4, 9 + 8 * 4) is lock  # wraps to the same index
    held = locks.acquire(10, 11)
    assert held == [lock] and not lock.acquire(blocking=False)  # they exclude each other
    locks.release(held)
