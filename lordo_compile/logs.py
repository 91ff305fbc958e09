"""What the compiler did, on stderr, without code changes: `LORDO_LOGS=passes,graphs,comm`.

    passes  after each capture: what each pass changed, per phase (as `step.explain()`)
    graphs  after each capture: a note per logging call inside the step (run once at capture,
            or dropped), then every phase's final graph, as stable text
    comm    after each capture: the collectives each phase issues and their bytes; and the
            running byte count every time a phase with collectives runs

Messages go to the `lordo_compile` logger (a stderr handler is added when the variable
is set), so `logging` configuration applies as usual.
"""

from __future__ import annotations

import logging
import os

CHANNELS = ("passes", "graphs", "comm")
logger = logging.getLogger("lordo_compile")


def enabled() -> frozenset[str]:
    """The channels LORDO_LOGS turns on; an unknown name is an error that lists the known ones."""
    names = frozenset(n.strip() for n in os.environ.get("LORDO_LOGS", "").split(",") if n.strip())
    unknown = names - set(CHANNELS) - {"all"}
    if unknown:
        raise ValueError(f"LORDO_LOGS names {sorted(unknown)}; known channels: {', '.join(CHANNELS)} (or all)")
    if names and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[lordo_compile %(channel)s] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return frozenset(CHANNELS) if "all" in names else names


def emit(channel: str, message: str) -> None:
    for line in message.splitlines():
        logger.info(line, extra={"channel": channel})
