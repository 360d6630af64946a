"""The build stage's error, in a module of its own: the CLI catches it for every command, and
importing it must not import the build's dependencies (torch, the exporter, the pass pipeline)."""


class BuildError(RuntimeError):
    """A build cannot proceed; the message names the offending input."""
