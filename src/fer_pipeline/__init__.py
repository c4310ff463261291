"""fer-pipeline."""
