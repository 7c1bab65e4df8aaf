"""Small helpers shared by every layer (no model, no MLflow)."""
