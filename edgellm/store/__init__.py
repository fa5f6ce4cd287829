"""Models on disk: the catalog of installed models and their content-addressed files."""
