"""Configs of `experiments.detr.train` (`get_config(arg)`)."""
