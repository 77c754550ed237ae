"""A Flower app whose clients return a fixed synthetic update (for benchmarks)."""
