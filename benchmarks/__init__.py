"""Commands that produce every figure a doc quotes: `python -m benchmarks.<name> [--json PATH]`."""
