"""Every benchmark: the `u2moe bench` commands and the scripts beside them (`python -m u2moe.bench.NAME`)."""
