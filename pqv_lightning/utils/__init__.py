"""Helpers every layer shares (argument checks, atomic files, error summaries, batches); no pqv imports."""
