"""Head scoring: needle trials, attention capture, the score rules, head-score files (HeadKV format), and
`estimate` / `merge`, which run a model over the trials and score every head."""
