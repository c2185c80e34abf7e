"""The host side: make a served disk a block device on this machine, and undo it.

Two ways, one interface (`attach`, `detach`, `attachments`):

- `nbd` (the kernel's NBD driver): `nbd-client` connects /dev/nbdN to the export. The
  kernel holds the connection; its state is read back from /sys/block/nbd*/pid.
- `fuse` (no kernel NBD driver, as in containers and on our CI machines): `nbdfuse`
  exposes the export as a file, `losetup` turns that file into /dev/loopN. No kernel
  object remembers that the two belong together, so attach writes a record
  (RUN_DIR/attachments/loopN.json) and `attachments` cross-checks it with the loop
  device's backing file and the nbdfuse process.

Modules: `nbdclient` (pure: the nbd-client command lines and their refusals), `kernel`
(the nbd driver and sysfs), `fuse` (nbdfuse + loop), `records` (the attachment records),
`attach` (the operations), `cli` (the click edge). Errors are `errors.HostError`, turned
into a message and exit status 1 once, in `cli`.
"""
