"""The requester's commands (`gpumarket login`, `submit`, `jobs`, `logs`, ...), merged
into the `gpumarket` CLI."""
