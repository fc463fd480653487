"""Evaluation: tasks (NIAH, synthetic, RULER, LongBench), `evaluate` (prefill once, compress many), head ablation and
latency."""

from headscore.core.exports import lazy_exports

# lazy: importing the package imports none of its modules (fast `headscore --help`, no cycles)
__all__, __getattr__ = lazy_exports(__name__, {
    "tasks": ["Sample", "Task", "get_task", "score"],
    "evaluate": ["EvaluateOptions", "Condition", "plan_conditions", "evaluate", "prepare_evaluate", "run_evaluate"],
    "ablate": ["prepare", "execute", "run_ablation"],
    "latency": ["measure_lengths", "run_latency"],
})
