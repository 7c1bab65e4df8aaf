"""microseg."""
