"""Errors ldmkit raises for user mistakes.

The CLI turns any `LdmkitError` into one line on stderr and exit code 2; anything else is a bug
and may raise normally with a traceback.
"""


class LdmkitError(Exception):
    """A mistake the user can fix: bad input, a bad file, an impossible request."""


class InvalidArgument(LdmkitError, ValueError):
    """An option or argument outside what is allowed."""


class CheckpointError(LdmkitError):
    """A checkpoint file or folder that cannot be read safely or does not fit the model."""


class GenerationError(LdmkitError):
    """Generation failed in a way the user should hear about (e.g. NaN images)."""


def check_choice(name: str, value: str, allowed) -> str:
    """Return `value` if it is one of `allowed`, else raise a one-line InvalidArgument."""
    if value not in allowed:
        raise InvalidArgument(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")
    return value
