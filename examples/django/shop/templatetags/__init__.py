"""Template tags of the shop app."""
