"""A client host's workload (run with `ip netns exec`): write and read a disk over NBD in
a loop, and report on stdout, one line per event, for the test to follow.

    python ns_writer.py nbds://HOST:PORT/DISK TLS_DIR   (ca-cert.pem, client-*.pem)
    READY                   connected
    OK <n>                  n writes acknowledged so far (every 20th)
    ERR <errno> <n>         the first failed request after a run of successes
    RECOVERED <n>           the first success after failures (same connection)
    VERIFIED <k> <landed> | MISMATCH <offset> <acked> <found>
                            answer to a line "VERIFY" on stdin, or to "VERIFY_AT <uri>": read
                            back through a new connection to that URI (another server of the
                            disk, after a failover); <landed>: blocks holding the write that
                            failed instead (it got no answer, so it may have landed or not)

The loop paces retries after a failure (RETRY_PAUSE) so a locked disk is not hammered;
it stops at EOF on stdin.
"""

import sys
import threading
import time

import nbd

BLOCK = 4096
SLOTS = 256
RETRY_PAUSE = 0.05


def pattern(i: int) -> bytes:
    return (i.to_bytes(8, "little") * (BLOCK // 8))


def main(uri: str, tls_dir: str) -> None:
    h = nbd.NBD()
    h.set_tls_certificates(tls_dir)  # the URI's nbds:// makes TLS required
    h.connect_uri(uri)
    lock = threading.Lock()
    acked: dict[int, int] = {}
    unanswered: dict[int, int] = {}  # a write that failed may still have landed (NBD: no answer, no promise)
    stop = threading.Event()
    print("READY", flush=True)

    def loop():
        i, failing = 0, False
        while not stop.is_set():
            off = (i % SLOTS) * BLOCK
            try:
                with lock:
                    unanswered[off] = i
                    h.pwrite(pattern(i), off, nbd.CMD_FLAG_FUA)
                    acked[off] = i
                    del unanswered[off]
                    h.pread(BLOCK, off)
            except nbd.Error as e:
                if not failing:
                    print(f"ERR {e.errno} {len(acked)}", flush=True)
                failing = True
                time.sleep(RETRY_PAUSE)
                continue
            if failing:
                print(f"RECOVERED {i}", flush=True)
                failing = False
            i += 1
            if i % 20 == 0:
                print(f"OK {i}", flush=True)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    for line in sys.stdin:
        words = line.split()
        if words and words[0] in ("VERIFY", "VERIFY_AT"):
            with lock:
                r = h
                if len(words) == 2:
                    r = nbd.NBD()
                    r.set_tls_certificates(tls_dir)
                    r.connect_uri(words[1])
                bad, landed = [], 0
                for off, i in acked.items():
                    got = r.pread(BLOCK, off)
                    if got != pattern(i):
                        if got == pattern(unanswered.get(off, i)):
                            landed += 1
                            continue
                        bad.append(f"{off} {i} {int.from_bytes(got[:8], 'little')}")
                if r is not h:
                    r.shutdown()
            print(f"MISMATCH {bad[0]}" if bad else f"VERIFIED {len(acked)} {landed}", flush=True)
    stop.set()
    t.join(timeout=30)
    h.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
