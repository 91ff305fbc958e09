"""Policy: which rewrites a compiled step gets. `Policy()` is the identity."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Policy:
    """The rewrites to apply to a captured training step.

    Each field is the option object of one pass (None: that pass is off). With every
    field off, the step is compiled unchanged through the identity pass.

    Raises:
      ValueError: if `extra_passes` is not a tuple of registered pass names.
    """

    extra_passes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.extra_passes, str) or not all(isinstance(n, str) for n in self.extra_passes):
            raise ValueError(
                f"Policy.extra_passes must be a tuple of registered pass names, got {self.extra_passes!r}"
            )
        object.__setattr__(self, "extra_passes", tuple(self.extra_passes))

    @classmethod
    def identity(cls) -> "Policy":
        return cls()

    def describe(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if v not in (None, ())}
        inner = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        return f"Policy({inner})"
