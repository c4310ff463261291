"""Data stages: validate, clean and split, with their shared helpers (manifest, images)."""
