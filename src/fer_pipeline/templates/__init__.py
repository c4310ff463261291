"""Templates rendered by the package (the release's model card)."""
