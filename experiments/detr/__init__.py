"""DETR with iRPE: memory benchmark and detection on image files."""
