"""The disk platform: encryption sets, disks, snapshots and images, and their keys.

- `errors`: the typed refusals of the domain (mapped to HTTP status once, in `nbdserver.api`).
- `model`: the records and their named states.
- `rules`: the reference design's rules, one function each, each refusal naming its rule.
- `keys`: DEK envelopes: wrap and unwrap through the key service.
- `access`: revocation: the change-stream watcher, the lease re-check, the grace period.
- `copy`: ciphertext copies (snapshots) and re-encrypting copies (disks from sources).
- `service`: `Platform`, the operations, committing state before it answers.
"""
