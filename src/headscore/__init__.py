"""headscore: find the attention heads that retrieve and reason over long contexts (HeadKV),
and give each head its own KV-cache budget."""

from headscore.core.errors import HeadscoreError

__version__ = "0.1.0"

__all__ = ["HeadscoreError", "__version__"]
