"""Exceptions a user can act on. Each message names the line, op or option, and a fix."""

from __future__ import annotations

import re


class CaptureError(NotImplementedError):
    """The training step cannot be captured as one graph."""


class PassError(RuntimeError):
    """A pass failed; the message names it and the passes that ran before it."""


def user_line(stack_trace: str | None) -> str:
    """`file:line: code` of the innermost user frame in an FX node's stack trace."""
    if not stack_trace:
        return "an unknown line"
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', stack_trace)
    user = [f for f in frames if "/lordo_compile/" not in f[0] and "/torch/" not in f[0]]
    if not user:
        return "an unknown line"
    path, line, func, code = user[-1]
    return f"{path}:{line} in {func}: `{code.strip()}`"
