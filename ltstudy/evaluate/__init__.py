"""Evaluations of a run: perplexity, passkey retrieval, RULER, lm-evaluation-harness tasks and
throughput."""
