"""The one home of every default the library and the CLI share (the CLI's options are built from these).

Compression parameters follow the HeadKV paper and its official code: B = 128 entries per head with the
observation window w = 8 included, β = 1.01 (pool = floor((B − w) / β) per head), SnapKV's max-pool kernel 7,
Ada-SnapKV's floor α = 0.2, StreamingLLM's 4 sink tokens, PyramidKV's β_p = 20.
"""

from __future__ import annotations

BUDGET = 128  # B: average KV entries per head, observation window included (the paper's KV size)
WINDOW = 8  # w: the observation window, kept by every head on top of its budget
BETA = 1.01  # HeadKV pool control, > 1 (larger = smaller shared pool)
TEMP = 1.0  # HeadKV importance temperature
KERNEL = 7  # SnapKV's max-pool width over the window scores
ALPHA = 0.2  # Ada-SnapKV's per-head floor, a fraction of B − w
SINKS = 4  # StreamingLLM's attention-sink tokens
PYRAMID_BETA = 20.0  # PyramidKV: the last layer keeps floor((B − w) / pyramid_beta)

EVALUATE_BUDGETS = (32, 64, 128, 256)  # evaluate's KV sizes
TUNE_BUDGETS = (64, 128)  # tune's KV sizes
EVALUATE_METHODS = ("full", "snapkv", "pyramidkv", "ada-snapkv", "headkv-r", "headkv-r2")  # evaluate's methods
TUNE_BASELINES = ("snapkv", "ada-snapkv")  # the methods tune compares on its test split
BETA_GRID = (1.005, 1.01, 1.1, 1.2, 1.5, 2.0)  # tune's β grid
TEMPLATE = "chat"  # prompt template of generated prompts (compress, ablate, evaluate's niah/synthetic, tune)

# the authors' behaviour, selectable (docs/fidelity.md); these defaults are headscore's
BEYOND_PROMPT = "clamp"  # a head keeps at most the prompt ("keep": a layer whose budget exceeds it stays whole)
SCORE_DTYPE = "float32"  # window scores rounded to this dtype before top-k
PYRAMID_SCHEDULE = "linear"  # PyramidKV per-layer budgets: exact interpolation
ADA_ALLOCATION = "pool"  # Ada-SnapKV: floor + top (1 - alpha) share of the pooled scores
