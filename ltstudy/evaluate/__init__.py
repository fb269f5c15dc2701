"""Evaluations of a run: perplexity, passkey retrieval, throughput."""
