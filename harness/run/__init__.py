"""Running: the engine, the supervisor and its worker processes, the run directory, the reference, training steps, deadlines and timing."""
