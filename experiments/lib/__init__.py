"""Machinery every experiment shares: checkpoints, metrics, CLI, the loop."""
