"""criu, the process-tree checkpointer: finding a working one, explaining its failures and reading its images."""
