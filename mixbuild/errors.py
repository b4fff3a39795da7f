"""One error hierarchy with one message format.

Every user-facing failure says what failed, what was expected, what was found and what to do.
The CLI prints the message (no traceback unless --debug) and exits with ``exit_code``.
"""

from __future__ import annotations


class MixbuildError(Exception):
    """A failure caused by the user's input or environment (exit code 2)."""

    exit_code = 2

    def __init__(self, what: str, *, expected: str | None = None, found: str | None = None,
                 hint: str | None = None) -> None:
        self.what = what
        self.expected = expected
        self.found = found
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.what]
        if self.expected is not None:
            lines.append(f"  expected: {self.expected}")
        if self.found is not None:
            lines.append(f"  found:    {self.found}")
        if self.hint is not None:
            lines.append(f"  fix:      {self.hint}")
        return "\n".join(lines)


class ConfigError(MixbuildError):
    """config.json is missing, malformed, or describes something that is not a Mixtral model."""


class CheckpointError(MixbuildError):
    """A weight file is missing, truncated, corrupt, or holds the wrong tensors."""


class ArtifactError(MixbuildError):
    """An exported artifact or engine directory is missing, corrupt, or inconsistent."""


class UsageError(MixbuildError):
    """Options that contradict each other or cannot be honoured."""


class MissingDependencyError(MixbuildError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package '{module}', which is not installed",
            hint=f"pip install 'mixbuild[{extra}]'",
        )


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency lazily, or raise a MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(module, extra, purpose) from exc


def choice(kind, value, what: str):
    """`kind(value)` for an Enum `kind` (an instance passes through), or a UsageError naming
    `what` and listing the accepted values."""
    try:
        return kind(getattr(value, "value", value))
    except ValueError as exc:
        raise UsageError(f"unknown {what} '{value}'", expected=" | ".join(m.value for m in kind),
                         found=repr(value)) from exc
