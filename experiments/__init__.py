"""Research sweeps and measurements behind docs/results.md and docs/experiments/."""
