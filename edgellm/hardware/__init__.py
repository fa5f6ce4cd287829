"""The board this runs on, and the backend plan that follows from it."""
