"""Experiments with irpe_jax: benchmarks, training and evaluation."""
