"""sockrepair's benchmarks: the C reference, the engine, batches, lock methods, peer-seen gaps against criu and
across hosts; `sockrepair.bench.run_all` runs them all and writes the report (`sockrepair bench`)."""
