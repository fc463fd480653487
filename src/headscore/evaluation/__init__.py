"""Evaluation: tasks (NIAH, synthetic, LongBench), `evaluate` (prefill once, compress many), head ablation and
latency."""
