"""attnlab benchmarks: kernel grid, MQAR zoo and LM train-step throughput.

Run from the repository root (this package is not installed):

    python -m benchmarks.kernels --quick      # kernel x mask x pass grid
    python -m benchmarks.zoo --quick          # MQAR quality against cost
    python -m benchmarks.train_step           # LM tokens/s and MFU

Every run writes JSON + markdown through ``benchmarks.report`` with the device, the
library versions, the command line and the date, so results can be committed as-is.
"""
