"""The ground floor every stage stands on: errors, atomic files and fingerprints, the journal, plots, metrics,
model loading and assets, haystack sources, prompts and the shared attention pieces."""
