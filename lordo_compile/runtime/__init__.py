"""Runtime: state passes asked for, the phase schedule, and the per-call executor."""
