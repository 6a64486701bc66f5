"""DeiT with iRPE: training, evaluation, prediction, demos and datasets."""
