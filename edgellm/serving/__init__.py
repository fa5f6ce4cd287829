"""The HTTP layer: routes, auth, and the mapping of failures to OpenAI-shaped errors."""
