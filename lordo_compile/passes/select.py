"""Which parameters a pass takes: the `params=` selectors every option type accepts.

    params=None                     2-D weights of nn.Linear, not embeddings or an output head
    params="attn.q"                 a regex searched in the parameter's name
    params=nn.Linear                module type(s)
    params=lambda name, info: ...   a predicate on the name and `ParamInfo`

Helpers for passes; not a pass itself.
"""

from __future__ import annotations

import re

from torch import nn

from ..graph import ParamInfo

_HEAD = re.compile(r"(^|\.)(lm_head|head|output|classifier)\.weight$")


def validate_selector(owner: str, selector: object) -> None:
    """Check a `params=` selector: None, a regex, nn.Module type(s), or a callable.

    Raises:
      ValueError: naming `owner.params` and what it must be.
    """
    ok = (
        selector is None
        or isinstance(selector, str)
        or (isinstance(selector, type) and issubclass(selector, nn.Module))
        or (isinstance(selector, tuple) and all(isinstance(t, type) and issubclass(t, nn.Module) for t in selector))
        or callable(selector)
    )
    if not ok:
        raise ValueError(
            f"{owner}.params must be None, a regex on parameter names, nn.Module type(s), or "
            f"a callable (name, ParamInfo) -> bool; got {selector!r}"
        )
    if isinstance(selector, str):
        try:
            re.compile(selector)
        except re.error as error:
            raise ValueError(f"{owner}.params is not a valid regex ({error}): {selector!r}") from None


def choose_matrix(selector: object, rank: int, info: ParamInfo) -> str | None:
    """None when the selector takes this parameter, else why it is left alone.

    Default: 2-D weights of nn.Linear, not embeddings, not the output head. A matrix whose
    smaller side is <= `rank` is left alone (0: no such limit).
    """
    if len(info.shape) != 2:
        return "not a matrix"
    if selector is None:
        if info.module_type is None:
            return "its module is unknown (select it with params=...)"
        if issubclass(info.module_type, nn.Embedding):
            return "embedding"
        if not issubclass(info.module_type, nn.Linear):
            return f"not an nn.Linear weight ({info.module_type.__name__})"
        if _HEAD.search(info.name):
            return "output head"
    elif isinstance(selector, str):
        if not re.search(selector, info.name):
            return f"name does not match {selector!r}"
    elif isinstance(selector, (type, tuple)):
        if info.module_type is None or not issubclass(info.module_type, selector):
            return "module type not selected"
    elif not selector(info.name, info):
        return "not selected"
    if min(info.shape) <= rank:
        return f"smaller side {min(info.shape)} <= rank {rank}"
    return None
