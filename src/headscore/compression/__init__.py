"""Head-level KV compression: per-head budgets from head scores, the presses (one registry), the head-wise cache
with its attention function, and generation on it."""

from headscore.core.exports import lazy_exports

# lazy: importing the package imports none of its modules (fast `headscore --help`, no cycles)
__all__, __getattr__ = lazy_exports(__name__, {
    "budgets": ["Budgets"],
    "allocation": ["ALLOCATIONS", "register_allocation", "allocate", "allocate_sweep"],
    "budgets_file": ["write_budgets", "read_budgets", "read_budget_sweep", "write_allocations"],
    "scorers": ["SCORERS", "Scorer", "ScorerInputs", "register_scorer"],
    "presses": ["PRESSES", "Press", "BudgetPress", "register_press", "make_press", "HeadKVPress"],
    "cache": ["HeadwiseCache"],
    "generation": ["prefill", "prefill_compressed", "compress_state", "decode", "generate_ids", "compress_generate",
                   "compress_files", "KVReport", "CompressResult"],
})
