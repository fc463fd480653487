"""Head-level KV compression: methods as a token scorer × a budget allocation (two registries), per-head budgets
from head scores, the head-wise cache with its attention function, and generation on it."""

from headscore.core.exports import lazy_exports

# lazy: importing the package imports none of its modules (fast `headscore --help`, no cycles)
__all__, __getattr__ = lazy_exports(__name__, {
    "budgets": ["Budgets"],
    "budgets_file": ["write_budgets", "read_budgets", "read_budget_sweep", "write_allocations"],
    "allocation": ["ALLOCATIONS", "Allocation", "register_allocation", "allocate", "allocate_sweep"],
    "scorers": ["SCORERS", "MODIFIERS", "Scorer", "ScorerInputs", "register_scorer", "register_extra_pass"],
    "presses": ["PRESSES", "Press", "ScoredPress", "register_press", "make_press", "parse_method"],
    "cache": ["HeadwiseCache"],
    "generation": ["prefill", "prefill_compressed", "compress_state", "compress_rows", "run_extra_passes", "decode",
                   "decode_rows", "fork", "answer_after", "generate_ids", "compress_generate", "compress_files",
                   "KVReport", "CompressResult"],
})
