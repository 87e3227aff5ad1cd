"""Speed benchmarks: ours against the naive way, both measured in the same run (docs/performance.md)."""
