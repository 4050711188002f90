"""YAML to plain Python values that remember where each value was written.

PyYAML's loaders drop the node marks and keep the last of duplicate keys; composing the
node tree and building the values ourselves keeps both, so errors can name a line.
"""

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

FieldPath = tuple[str | int, ...]
Position = tuple[int, int]


class YamlSyntaxError(Exception):
    def __init__(self, message: str, position: Position | None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


@dataclass
class MarkedDocument:
    value: Any
    # Every value's node by its path; ("resources", "gpus") -> the node of 16.
    nodes: dict[FieldPath, Node] = field(default_factory=dict)
    # Each mapping entry's key node, by the entry's path.
    key_nodes: dict[FieldPath, Node] = field(default_factory=dict)
    # Problems found while building the values: (path, message, node to point at).
    issues: list[tuple[FieldPath, str, Node]] = field(default_factory=list)

    def position(self, path: FieldPath, key: bool = False) -> Position | None:
        """1-based (line, column) of the value at path, or of its key if asked."""
        node = (self.key_nodes if key else self.nodes).get(path)
        return node_position(node) if node is not None else None

    def raw_scalar(self, path: FieldPath) -> str | None:
        """The scalar's text as written (8192, true, 1.50), None for nulls and non-scalars."""
        node = self.nodes.get(path)
        if isinstance(node, ScalarNode) and node.tag != "tag:yaml.org,2002:null":
            return str(node.value)
        return None


def node_position(node: Node) -> Position:
    return node.start_mark.line + 1, node.start_mark.column + 1


def load_marked(source: str | bytes) -> MarkedDocument:
    """Composes one YAML document (SafeLoader rules); raises YamlSyntaxError."""
    try:
        root = yaml.compose(source, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or exc.context or "invalid YAML"
        position = (mark.line + 1, mark.column + 1) if mark else None
        raise YamlSyntaxError(message, position) from exc
    except yaml.YAMLError as exc:  # e.g. ReaderError: bytes that are not UTF-8
        raise YamlSyntaxError(str(exc), None) from exc
    doc = MarkedDocument(value=None)
    if root is not None:
        doc.value = _build(root, (), doc, set())
    return doc


# Builds scalars the way SafeLoader would (ints, floats, bools, nulls, timestamps).
_scalars = yaml.constructor.SafeConstructor()


def _build(node: Node, path: FieldPath, doc: MarkedDocument, parents: set[int]) -> Any:
    doc.nodes[path] = node
    if isinstance(node, ScalarNode):
        try:
            return _scalars.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            doc.issues.append((path, exc.problem or "unsupported value", node))
            return None
    # An alias can point back at one of its own parents; walking it would never end.
    if id(node) in parents:
        doc.issues.append((path, "refers to itself through an alias", node))
        return None
    parents = parents | {id(node)}
    if isinstance(node, SequenceNode):
        return [_build(item, (*path, i), doc, parents) for i, item in enumerate(node.value)]
    assert isinstance(node, MappingNode)
    result: dict[str, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode):
            doc.issues.append((path, "keys should be plain names", key_node))
            continue
        # Keys are names: `true:` or `8080:` are meant as the text written.
        key = str(key_node.value)
        if key in result:
            line = doc.key_nodes[(*path, key)].start_mark.line + 1
            doc.issues.append(((*path, key), f"duplicate key (first on line {line})", key_node))
            continue
        doc.key_nodes[(*path, key)] = key_node
        result[key] = _build(value_node, (*path, key), doc, parents)
    return result
