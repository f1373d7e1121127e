"""Hardware facts: the card table, GPU and CPU detection, and what a plan is for (GPUs or the CPU)."""
