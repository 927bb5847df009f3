"""Side-by-side speed benchmarks (rollout, training step, environment overhead); see docs/performance.md."""
