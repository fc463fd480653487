"""Head-level KV compression: per-head budgets from head scores, the presses (one registry), the head-wise cache
with its attention function, and generation on it."""
