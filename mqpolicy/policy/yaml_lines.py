"""YAML read with ``yaml.safe_load`` semantics, keeping the line of every mapping key and
list item: what lets every problem of a policy file be reported with its line.

Aliases (``*name``) are bounded before anything is built: an alias bomb ("billion laughs",
a few lines that expand to billions of values) and an alias inside its own anchor are
refused with :class:`YamlAliasError`."""

from __future__ import annotations

from typing import Any

import yaml


class LineMap(dict[Any, Any]):
    line: int = 0
    key_lines: dict[Any, int]


class LineList(list[Any]):
    line: int = 0
    item_lines: list[int]


#: How many values YAML aliases may repeat in all: far more than sharing a condition or a
#: list between rules needs, far fewer than an alias bomb's billions.
MAX_ALIAS_VALUES = 100_000


class YamlAliasError(yaml.constructor.ConstructorError):
    """Aliases that repeat too much (an alias bomb), or an alias inside its own anchor."""


class LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key and list item, and refuses
    aliases that expand past :data:`MAX_ALIAS_VALUES` repeated values."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_aliases(node)
        return super().construct_document(node)  # type: ignore[no-untyped-call]


def _check_aliases(root: yaml.Node) -> None:
    """Count the values the document has once its aliases are expanded, each node counted
    once per place it appears; refuse more than :data:`MAX_ALIAS_VALUES` beyond its
    distinct nodes, and a node that contains itself. Linear in the distinct nodes."""
    expanded: dict[int, int] = {}  # id(node) -> values under it, itself included
    open_nodes: set[int] = set()  # being counted: meeting one again is a cycle

    def count(node: yaml.Node) -> int:
        key = id(node)
        if key in expanded:
            return expanded[key]
        if key in open_nodes:
            raise YamlAliasError(None, None, "an alias inside its own anchor (a recursive "
                                 "structure)", node.start_mark)
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(count(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(count(k) + count(v) for k, v in node.value)
        open_nodes.discard(key)
        expanded[key] = total
        if total - len(expanded) > MAX_ALIAS_VALUES:
            raise YamlAliasError(
                None, None, f"aliases repeat more than {MAX_ALIAS_VALUES} values (an alias "
                "bomb?): write the values out, or share fewer", node.start_mark)
        return total

    count(root)


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
