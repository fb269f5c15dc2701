"""HTML report pages built from the collected results tables."""
