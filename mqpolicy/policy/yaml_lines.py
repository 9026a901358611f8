"""YAML read with ``yaml.safe_load`` semantics, keeping the line of every mapping key and
list item: what lets every problem of a policy file be reported with its line."""

from __future__ import annotations

from typing import Any

import yaml


class LineMap(dict[Any, Any]):
    line: int = 0
    key_lines: dict[Any, int]


class LineList(list[Any]):
    line: int = 0
    item_lines: list[int]


class LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key and list item."""


def _construct_mapping(loader: LineLoader, node: yaml.MappingNode) -> LineMap:
    result = LineMap()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result.key_lines:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: LineLoader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def line_of(container: Any, key: Any = None) -> int:
    """The line of ``key`` in a mapping or list read by :class:`LineLoader` (the
    container's own line without the key, 0 for any other value)."""
    if isinstance(container, LineMap):
        if key is not None and key in container.key_lines:
            return container.key_lines[key]
        return container.line
    if isinstance(container, LineList):
        if isinstance(key, int) and 0 <= key < len(container.item_lines):
            return container.item_lines[key]
        return container.line
    return 0


def find_line(value: Any, key: str | None) -> int:
    """The line of ``key`` anywhere inside ``value`` (first found, depth-first)."""
    if key is None:
        return 0
    if isinstance(value, LineMap):
        if key in value.key_lines:
            return value.key_lines[key]
        for v in value.values():
            line = find_line(v, key)
            if line:
                return line
    if isinstance(value, LineList):
        for v in value:
            line = find_line(v, key)
            if line:
                return line
    return 0
