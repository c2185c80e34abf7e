"""The benchmark harness behind `scripts/bench`: fio over NBD against several servers, side by side.

Modules, bottom up:
- `workloads`: the fio suite, as named `Workload` values (a registry, so kinds can be added).
- `fio`: pure fio glue: the command line for a workload and the parse of its JSON output.
- `targets`: the servers under test; each a `Target` with start()/stop() that yields an NBD URI.
- `harness`: runs the suite over the targets, interleaved, N times; medians and ratios.
- `report`: renders results as JSON, a Markdown table and a PNG chart.
- `cli`: argument parsing only (`python -m bench`).
"""
