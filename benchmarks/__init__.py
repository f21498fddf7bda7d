"""sockrepair's benchmarks: the C reference, the engine, batches, lock methods, peer-seen gaps against criu and
across hosts; `benchmarks.run_all` runs them all and writes the report (`sockrepair bench`)."""
