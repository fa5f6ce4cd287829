"""Signed software updates: a bundle of wheels installed side by side, switched to atomically,
kept only if the service comes back healthy (docs/update-format.md)."""

from edgellm.errors import InvalidRequest


class UpdateError(InvalidRequest):
    """An update that cannot be applied; the message says why, and nothing was changed."""

    code = "update_refused"
