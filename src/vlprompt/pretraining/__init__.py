"""Pretraining a small CLIP on the procedural toy world (the embedded default model)."""
