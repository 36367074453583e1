"""Cluster tooling: local services, Ray cluster configs, SLURM job scripts (imports rtrain, never the reverse)."""
