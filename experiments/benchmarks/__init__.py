"""Benchmarks of the lookups, the DeiT and DETR steps, and their report."""
