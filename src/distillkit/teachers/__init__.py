"""teachers."""
