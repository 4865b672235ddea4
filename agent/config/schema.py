"""Introspection of the resource models: every supported field path with its type, default and
bounds. Used to check docs/configuration.md against the models (and handy for `vipctl`)."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from agent.config.loader import KINDS
from agent.config.meta import LabelSelector, ObjectMeta


@dataclass(frozen=True)
class FieldDoc:
    kind: str
    path: str          # "spec.timers.holdTimeSeconds", lists as "[]"
    type: str
    default: Any
    required: bool
    bounds: str


def _strip(tp):
    """-> (inner type, is_list)"""
    is_list = False
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp, is_list
            tp = args[0]
        elif origin is list:
            is_list = True
            tp = typing.get_args(tp)[0]
        else:
            return tp, is_list


def _bounds(info, tp) -> str:
    lo = hi = None
    metas = list(info.metadata)
    for arg in [info.annotation, *typing.get_args(info.annotation)]:
        if typing.get_origin(arg) is typing.Annotated:
            metas += [m for a in typing.get_args(arg)[1:] for m in getattr(a, "metadata", [a])]
    for m in metas:
        for attr, is_lo in (("ge", True), ("min_length", True), ("le", False),
                            ("max_length", False)):
            v = getattr(m, attr, None)
            if v is not None:
                if is_lo:
                    lo = v
                else:
                    hi = v
    if typing.get_origin(tp) is Literal:
        return " \\| ".join(str(a) for a in typing.get_args(tp))
    if lo is None and hi is None:
        return ""
    return f"{'' if lo is None else lo}..{'' if hi is None else hi}"


def _type_name(tp, is_list) -> str:
    if typing.get_origin(tp) is Literal:
        name = "enum"
    elif tp is LabelSelector:
        name = "LabelSelector"
    elif isinstance(tp, type):
        name = {"str": "string", "int": "integer", "bool": "boolean", "dict": "map"}.get(
            tp.__name__, "object" if issubclass(tp, BaseModel) else tp.__name__)
    else:
        name = "map" if typing.get_origin(tp) is dict else str(tp)
    return f"list of {name}" if is_list else name


def field_docs(kind: str) -> list[FieldDoc]:
    model = KINDS[kind]
    out: list[FieldDoc] = []

    def walk(m: type[BaseModel], prefix: str):
        for name, info in m.model_fields.items():
            alias = info.alias or name
            if alias in ("apiVersion", "kind", "metadata") and not prefix:
                continue
            tp, is_list = _strip(info.annotation)
            path = f"{prefix}{alias}{'[]' if is_list else ''}"
            default = None if info.default in (PydanticUndefined, None) else info.default
            if info.default_factory is not None:
                default = info.default_factory()
                default = default if default not in ([], {}) else None
                if isinstance(default, BaseModel):
                    default = None
            out.append(FieldDoc(kind, path, _type_name(tp, is_list), default,
                                info.is_required(), _bounds(info, tp)))
            if isinstance(tp, type) and issubclass(tp, BaseModel) and tp not in (
                    LabelSelector, ObjectMeta) and not issubclass(tp, dict):
                walk(tp, path + ".")

    walk(model, "")
    return out
