"""Which model families headscore runs: attention layer kinds and the families refused from their config alone
(plain data, no torch: `core.assets` checks a GGUF's architecture with it before converting)."""

# attention layer kinds (transformers' `layer_types`): full attention is scored and compressed head-wise; sliding
# (and chunked) layers keep the bounded cache transformers builds for them
FULL_ATTENTION = "full_attention"
WINDOWED_ATTENTION = ("sliding_attention", "chunked_attention")
# families whose layers keep no per-token, per-head keys and values (checked from the config, before weights)
UNSUPPORTED_FAMILIES = {
    "deepseek_v2": "multi-head latent attention", "deepseek_v3": "multi-head latent attention",
    "deepseek_v32": "multi-head latent attention", "kimi_k25": "multi-head latent attention",
    "minicpm3": "multi-head latent attention", "glm4_moe_lite": "multi-head latent attention",
    "mamba": "state-space layers", "mamba2": "state-space layers", "falcon_mamba": "state-space layers",
    "falcon_h1": "state-space layers", "jamba": "state-space layers", "bamba": "state-space layers",
    "zamba": "state-space layers", "zamba2": "state-space layers", "nemotron_h": "state-space layers",
    "granitemoehybrid": "state-space layers", "lfm2": "convolution layers", "lfm2_moe": "convolution layers",
    "rwkv": "recurrent layers", "xlstm": "recurrent layers", "recurrent_gemma": "recurrent layers",
    "qwen3_next": "linear-attention layers", "qwen3_5": "linear-attention layers",
    "kimi_linear": "linear-attention layers", "minimax": "linear-attention layers",
}
UNSUPPORTED_REASON = {
    "multi-head latent attention": "keys and values are one low-rank latent shared by every head, so there is "
                                   "no per-head token cache to select from",
    "state-space layers": "they carry a fixed-size recurrent state instead of per-token keys and values",
    "convolution layers": "they carry a convolution state instead of per-token keys and values",
    "recurrent layers": "they carry a fixed-size recurrent state instead of per-token keys and values",
    "linear-attention layers": "they carry a fixed-size recurrent state instead of per-token keys and values",
}

