"""Every recipe key as data, read from the schema: section, dotted key, type, default, allowed values and
description. `rtrain recipe-keys` prints it; docs/reference/recipe-keys.md is generated from it (and a test
fails when the checked-in page differs). Also the valid keys of a section, for the error a wrong key gets."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo


@dataclass(frozen=True)
class KeyRow:
    section: str
    key: str  # dotted, from the recipe's top: optim.lr, analysis.layer_responses.every_epochs
    type: str
    default: str
    allowed: str
    description: str


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The Section class behind `X` or `X | None`, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        kinds = sorted({type(a).__name__ for a in args})
        return "/".join("string" if k == "str" else k for k in kinds)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if isinstance(annotation, type):
        return {"str": "string", "int": "int", "float": "float", "bool": "bool"}.get(annotation.__name__,
                                                                                    annotation.__name__)
    return str(annotation)


def _literals(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [v for a in typing.get_args(annotation) for v in _literals(a)]
    return []


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="),
           ("max_length", "length <="))


def allowed_values(info: FieldInfo) -> str:
    choices = _literals(info.annotation)
    if choices:
        text = ", ".join(json.dumps(c) for c in choices)
        return text + (", null" if "null" in type_name(info.annotation) else "")
    bounds = [f"{sign} {getattr(m, attr)}" for m in info.metadata for attr, sign in _BOUNDS if hasattr(m, attr)]
    return ", ".join(bounds)


def default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "(required)"
    value = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return "(section)"
    return json.dumps(value, default=str)


def _rows(model: type[BaseModel], prefix: str, section: str) -> list[KeyRow]:
    rows = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        rows.append(KeyRow(section, key, type_name(info.annotation), default_text(info), allowed_values(info),
                           " ".join((info.description or "").split())))
        nested = _section_model(info.annotation)
        if nested is not None:
            rows.extend(_rows(nested, f"{key}.", section))
    return rows


def key_rows(recipe_model: type[BaseModel] | None = None) -> list[KeyRow]:
    """One row per key of every section, in the schema's order (nested sections after their key)."""
    if recipe_model is None:
        from rtrain.config.recipe import Recipe

        recipe_model = Recipe
    rows = []
    for name, info in recipe_model.model_fields.items():
        model = _section_model(info.annotation)
        if model is None:
            rows.append(KeyRow("(top)", name, type_name(info.annotation), default_text(info),
                               allowed_values(info), " ".join((info.description or "").split())))
        else:
            rows.extend(_rows(model, f"{name}.", name))
    return rows


def section_keys(loc: tuple[str, ...], recipe_model: type[BaseModel] | None = None) -> list[str] | None:
    """The valid keys at `loc` (a path of sections, () = the top), or None when loc is not a section."""
    if recipe_model is None:
        from rtrain.config.recipe import Recipe

        recipe_model = Recipe
    model: type[BaseModel] | None = recipe_model
    for part in loc:
        info = model.model_fields.get(part) if model is not None else None
        model = _section_model(info.annotation) if info is not None else None
        if model is None:
            return None
    return list(model.model_fields)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or " "


def render_markdown(rows: list[KeyRow]) -> str:
    out = ["# Recipe keys", "",
           "<!-- generated by `rtrain recipe-keys --format markdown`; do not edit: change the schema "
           "(rtrain/config/sections.py) and regenerate -->", "",
           "Every key a recipe may set, with its type, default and allowed values. Set them in the recipe's YAML "
           "(`optim: {lr: 0.2}`) or on the command line as dotted overrides (`optim.lr=0.2`, typed like YAML). "
           "A key that is not listed here is refused before anything starts, with the valid keys of its section.",
           ""]
    sections = list(dict.fromkeys(r.section for r in rows))
    title = {s: "top level" if s == "(top)" else s for s in sections}
    out += ["Sections: " + ", ".join(f"[{title[s]}](#{title[s].replace(' ', '-')})" for s in sections), ""]
    for section in sections:
        out += [f"## {title[section]}", "", "| key | type | default | allowed | description |",
                "|---|---|---|---|---|"]
        for r in rows:
            if r.section == section:
                out.append(f"| `{r.key}` | {_cell(r.type)} | `{_cell(r.default)}` | {_cell(r.allowed)} | "
                           f"{_cell(r.description)} |")
        out.append("")
    return "\n".join(out)


def render_table(rows: list[KeyRow]) -> str:
    width = max(len(r.key) for r in rows)
    lines = []
    for r in rows:
        allowed = f" [{r.allowed}]" if r.allowed else ""
        lines.append(f"{r.key:<{width}}  {r.type} = {r.default}{allowed}")
        if r.description:
            lines.append(f"{'':<{width}}  {r.description}")
    return "\n".join(lines) + "\n"


def render_json(rows: list[KeyRow]) -> str:
    return json.dumps([r.__dict__ for r in rows], indent=1) + "\n"
