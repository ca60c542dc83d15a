"""Training: the loop (engine), its state on disk, optimizer and schedules, determinism, the runner the scripts call."""
