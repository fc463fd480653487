"""Head scoring: needle trials, attention capture, the score rules, head-score files (HeadKV format), and
`estimate` / `merge`, which run a model over the trials and score every head."""

from headscore.core.exports import lazy_exports

# lazy: importing the package imports none of its modules (fast `headscore --help`, no cycles)
__all__, __getattr__ = lazy_exports(__name__, {
    "trials": ["Trial", "build_needle_trials", "write_trials", "read_trials", "load_needles"],
    "capture": ["attention_capture", "AttentionCapture"],
    "rules": ["RULES", "ScoreRule", "score_rule", "get_rule", "rule_for_scores", "r2_scores", "retrieval_scores"],
    "head_scores": ["HeadScores", "read_head_scores", "write_head_scores"],
    "estimate": ["EstimateOptions", "EstimateResult", "estimate", "estimate_rules", "run_estimate",
                 "run_estimate_rules", "merge_runs"],
})
