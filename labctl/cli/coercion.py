"""Typer's argument coercion for plain types, without importing pydantic.

Typer 0.2x coerces every command-line value through a pydantic TypeAdapter.
Importing pydantic and building the adapters costs about 0.1 s per command:
more than half of ``labctl down LAB`` and most of what ``labctl --help`` and
``labctl status`` may take.  The commands here take only ``str``, ``bool``,
``int``, ``float`` (with bounds), ``Path``, enums and lists of them, for
which the conversion is one call (``int("5")``, Typer's own choice and path
checks); those are converted here, and every other annotation (literals,
custom parsers, files, datetimes) still goes through Typer's pydantic path.
Pydantic is then imported only by commands that load lab files, which need
it for the schema anyway.

``install()`` is a no-op on a Typer without this coercion layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off", ""}


def _to_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a valid boolean.")


def _number(kind: type[int] | type[float], label: str, info: Any) -> Callable[[Any], Any]:
    low, high, clamp = info.min, info.max, info.clamp

    def convert(value: Any) -> Any:
        if isinstance(value, kind) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = kind(str(value).strip())
            except ValueError:
                raise ValueError(f"{value!r} is not a valid {label}.") from None
        if clamp:
            return kind(min(max(number, low if low is not None else number), high if high is not None else number))
        if (low is not None and number < low) or (high is not None and number > high):
            bounds = f"{'' if low is None else f'{low}<='}x{'' if high is None else f'<={high}'}"
            raise ValueError(f"{value} is not in the range {bounds}.")
        return number

    return convert


def _choice(annotation: type[Enum], info: Any) -> Callable[..., Any]:
    from typer._param_types import coerce_cli_choice  # Typer's own matching, which needs no pydantic

    def convert(value: Any, param: Any = None, ctx: Any = None) -> Any:
        return coerce_cli_choice(value, choices=list(annotation), case_sensitive=info.case_sensitive, ctx=ctx)

    convert.needs_context = True  # type: ignore[attr-defined]
    return convert


def _leaf(annotation: Any, info: Any) -> Callable[[Any], Any] | None:
    """A converter for one plain annotation, or None when Typer's own path must decide."""
    if info.parser is not None:
        return None
    if annotation is str:
        return _to_str
    if annotation is bool:
        return _to_bool
    if annotation is int:
        return _number(int, "integer", info)
    if annotation is float:
        return _number(float, "float", info)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return _choice(annotation, info)
    if annotation is Path and info.path_type in (None, Path):
        return _to_path_checked(info)
    return None


def _to_path_checked(info: Any) -> Callable[[Any], Any]:
    from typer._param_types import coerce_cli_path  # exists/file_okay/readable checks, pydantic-free for a Path

    def convert(value: Any, param: Any = None, ctx: Any = None) -> Any:
        path = value if isinstance(value, Path) else Path(_to_str(value))
        return coerce_cli_path(path, info, path_type=Path, param=param, ctx=ctx)

    convert.needs_context = True  # type: ignore[attr-defined]
    return convert


def _converter(annotation: Any, info: Any) -> Callable[[Any], Any] | None:
    if get_origin(annotation) is list:
        (item_type,) = get_args(annotation) or (str,)
        item = _leaf(item_type, info)
        if item is None:
            return None

        def each(value: Any, param: Any = None, ctx: Any = None) -> list[Any]:
            values = value if isinstance(value, list | tuple) else [value]
            if getattr(item, "needs_context", False):
                return [item(v, param, ctx) for v in values]  # type: ignore[call-arg]
            return [item(v) for v in values]

        each.needs_context = True  # type: ignore[attr-defined]
        return each
    if get_origin(annotation) is not None:
        return None
    return _leaf(annotation, info)


def install() -> None:
    """Route Typer's coercion of plain types through ``_converter``; everything else is left to Typer."""
    try:
        from typer import _coercion, core
        from typer._click.exceptions import BadParameter
    except ImportError:  # a Typer without the pydantic coercion layer
        return
    original = _coercion.build_runtime_param
    if getattr(original, "labctl_plain", False):
        return

    @dataclass(frozen=True)
    class PlainRuntimeParam(_coercion.RuntimeParam):
        convert: Callable[..., Any] = _to_str

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            try:
                if getattr(self.convert, "needs_context", False):
                    return self.convert(value, param, ctx)
                return self.convert(value)
            except ValueError as exc:
                raise BadParameter(str(exc), ctx=ctx, param=param) from None

    def build_runtime_param(descriptor: Any) -> Any:
        convert = None if descriptor.file_annotation is not None else _converter(
            descriptor.annotation, descriptor.parameter_info
        )
        if convert is None:
            return original(descriptor)
        return PlainRuntimeParam(
            parameter_info=descriptor.parameter_info, annotation=descriptor.annotation, convert=convert
        )

    build_runtime_param.labctl_plain = True  # type: ignore[attr-defined]
    core.build_runtime_param = build_runtime_param  # core calls the name it imported
    _coercion.build_runtime_param = build_runtime_param
