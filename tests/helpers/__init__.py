"""Reusable test helpers (tiny tokenizers, ...) shared by the unit and integration tests."""
