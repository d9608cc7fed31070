"""Benches that run device processes (the runtime's workers, torch tensor parallelism); the pure
measurements (overhead, targets, generation, emulated links) live in prism_edge.bench."""
