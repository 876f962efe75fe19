"""Studies: each a question about the recipe or the statistics, its command, and its result
(``python -m studies.NAME``; studies/README.md holds the log)."""
