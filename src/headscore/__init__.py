"""headscore: find the attention heads that retrieve and reason over long contexts (HeadKV),
and give each head its own KV-cache budget.

The library's public API, importable from here (`from headscore import load_model, make_press, ...`); each
name is imported from its module on first use, so `import headscore` (and `headscore --help`) loads no torch.
"""

from headscore.core.errors import HeadscoreError as HeadscoreError  # re-exported (also eager: it is light)
from headscore.core.exports import lazy_exports

__version__ = "0.1.0"

_names, __getattr__ = lazy_exports(__name__, {
    # models
    "core.model": ["Geometry", "load_model", "load_tokenizer", "load_geometry", "eos_ids", "with_cache"],
    "core.attention": ["use_attention"],
    # head scores: needle trials, estimate, the HeadKV score files
    "scoring.trials": ["Trial", "build_needle_trials", "read_trials", "write_trials"],
    "scoring.rules": ["RULES", "score_rule"],
    "scoring.estimate": ["EstimateOptions", "EstimateResult", "estimate", "run_estimate", "merge_runs"],
    "scoring.head_scores": ["HeadScores", "read_head_scores", "write_head_scores"],
    # budgets and compression: scorers × allocations, presses, the head-wise cache, generation on it
    "compression.budgets": ["Budgets"],
    "compression.allocation": ["ALLOCATIONS", "Allocation", "register_allocation", "allocate", "allocate_sweep"],
    "compression.budgets_file": ["read_budgets", "write_budgets"],
    "compression.scorers": ["SCORERS", "Scorer", "ScorerInputs", "register_scorer"],
    "compression.presses": ["PRESSES", "Press", "register_press", "make_press", "parse_method"],
    "compression.cache": ["HeadwiseCache"],
    "compression.attention": ["HEADWISE_ATTENTION"],
    "compression.generation": ["prefill", "compress_state", "decode", "generate_ids", "compress_generate",
                               "answer_after", "CompressResult", "KVReport"],
    # evaluation: tasks and evaluate
    "evaluation.tasks": ["TASKS", "Task", "Sample", "register_task", "get_task"],
    "evaluation.evaluate": ["EvaluateOptions", "evaluate", "run_evaluate"],
    # the whole study
    "study.reproduce": ["run_study"],
})
__all__ = sorted([*_names, "HeadscoreError", "__version__"])
