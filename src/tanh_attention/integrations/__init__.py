"""Integrations with libraries that call attention (each imports its library lazily)."""
