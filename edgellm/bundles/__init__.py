"""Signed model bundles: the format, signatures, and the import that never loses a model."""
