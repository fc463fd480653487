"""The stages of `headscore reproduce`, in pipeline order.

Kept apart from `reproduce` (which imports every stage's library) so that the CLI names them without
importing torch: `headscore --help` stays fast.
"""

STAGES = ("needles", "estimate", "stability", "allocate", "evaluate", "tune", "ablate", "latency", "report")
SHARED_STAGES = ("estimate", "evaluate", "tune")  # every rank takes part under torchrun
