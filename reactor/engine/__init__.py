"""The job loop: the listener (wake-ups), the dispatcher (claim, render, outcome), the sweeper, and the
supervisor that restarts a part that fails."""
