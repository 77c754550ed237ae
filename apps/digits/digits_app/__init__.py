"""flower-privacy's digits demo app."""
