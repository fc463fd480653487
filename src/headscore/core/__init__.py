"""The ground floor every stage stands on: errors, atomic files and fingerprints, the journal, plots, metrics,
model loading and assets, haystack sources, prompts and the shared attention pieces."""

from headscore.core.exports import lazy_exports

# lazy: importing the package imports none of its modules (fast `headscore --help`, no cycles)
__all__, __getattr__ = lazy_exports(__name__, {
    "errors": ["HeadscoreError"],
    "files": ["atomic_open", "atomic_write_text", "write_json", "read_json", "read_jsonl", "fingerprint_bytes",
              "fingerprint_file", "versions", "hardware"],
    "journal": ["open_journal", "append_journal", "read_journal"],
    "plots": ["head_heatmap", "grid_heatmap", "line_plot"],
    "metrics": ["get_metric", "score_answers", "qa_f1", "rouge1_recall", "rouge_l"],
    "assets": ["DEFAULT_MODEL", "resolve_model", "cache_dir"],
    "model": ["Geometry", "load_model", "load_tokenizer", "load_geometry", "eos_ids"],
    "haystack": ["Haystack", "load_haystack"],
    "prompts": ["render_prompt", "encode_prompt", "HaystackTokens", "answer_token_span"],
    "attention": ["attention_rows", "use_attention"],
})
