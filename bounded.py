"""Untrusted values within bounds: YAML read with a node budget and without aliases, trees counted before they are
walked, values quoted in messages cut. An alias bomb (small as text, exponential as a tree), a cyclic structure, a
string of megabytes or an integer of thousands of digits costs no more than a normal value here. Used by config.py;
a problem is a Refused error of one line, which the caller prefixes with where the value came from."""
from __future__ import annotations

import yaml

# Bounds on a configuration's structure, checked before any value is printed or validated: DEFAULTS has about 110
# values, 3 deep; a tree beyond these is not a configuration (or is an alias bomb: small as text, exponential as a
# tree) and would take memory and time to walk, copy or print.
MAX_NODES = 10_000  # keys, values and list items, shared sub-trees counted every time they are reached
MAX_DEPTH = 50  # nested blocks and lists
MAX_FILE_BYTES = 1 << 20  # a config file (the largest in configs/ is under 4 kB)
SHOWN = 80  # characters of a value or a --set argument quoted in an error message


def shown(value, limit: int = SHOWN) -> str:
    """repr(value) cut to `limit` characters, in time bounded by `limit` whatever the value: every element visited
    writes at least one character, so long strings, long or deeply nested lists, shared sub-lists (an alias bomb)
    and huge integers are never rendered whole."""
    out, left = [], [limit + 1]

    def put(text: str) -> None:
        out.append(text[:left[0]])
        left[0] -= len(text)

    def walk(v) -> None:
        if left[0] <= 0:
            return
        if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 256:
            put(f"<integer of {int(v.bit_length() * 0.30103) + 1} digits>")  # str() of > 4300 digits raises
        elif v is None or isinstance(v, (bool, int, float)):
            put(repr(v))
        elif isinstance(v, (str, bytes)):
            put(repr(v[:left[0]]))
        elif isinstance(v, dict):
            put("{")
            for i, (k, x) in enumerate(v.items()):
                if left[0] <= 0:
                    break
                put(", " if i else "")
                walk(k)
                put(": ")
                walk(x)
            put("}")
        elif isinstance(v, (list, tuple, set, frozenset)):
            put("[" if isinstance(v, list) else "(" if isinstance(v, tuple) else "{")
            for i, x in enumerate(v):
                if left[0] <= 0:
                    break
                put(", " if i else "")
                walk(x)
            put("]" if isinstance(v, list) else ")" if isinstance(v, tuple) else "}")
        else:  # dates (YAML timestamps) and anything else: its type
            put(f"<{type(v).__name__}>")
    walk(value)
    text = "".join(out)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Refused(ValueError):
    """A value beyond these bounds, or text that is not valid YAML; the message is one line."""


def check_size(tree) -> None:
    """Refused if the tree holds more than MAX_NODES values or nests deeper than MAX_DEPTH; stops counting there
    (an alias bomb's or a cyclic structure's tree is never walked whole)."""
    stack, count = [(tree, 0)], 1
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list, tuple, set, frozenset)):
            if depth >= MAX_DEPTH:
                raise Refused(f"values nested more than {MAX_DEPTH} deep: not a configuration (DEFAULTS is 3 deep)")
            count += 2 * len(value) if isinstance(value, dict) else len(value)
            if count > MAX_NODES:
                raise Refused(f"more than {MAX_NODES} values: not a configuration (DEFAULTS has about 110; shared "
                              f"sub-lists count each time they are reached)")
            items = [x for kv in value.items() for x in kv] if isinstance(value, dict) else value
            stack.extend((x, depth + 1) for x in items)


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader for configs: no anchors or aliases (configs have no use for them, and aliases make a small
    text an exponential tree: the alias bomb), at most MAX_NODES nodes nested at most MAX_DEPTH deep (composing
    stops there), and no key twice in one mapping (YAML would keep the last silently)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.nodes, self.depth = 0, 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&name, *name) are not supported in "
                                              "configs: write the value out", event.start_mark)
        self.nodes += 1
        if self.nodes > MAX_NODES or self.depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_NODES} values or nested more than "
                                              f"{MAX_DEPTH} deep: not a configuration", event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if (key_node.tag, key_node.value) in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {shown(key_node.value)} appears twice "
                                                            f"in one mapping", key_node.start_mark)
                seen.add((key_node.tag, key_node.value))
        return super().construct_mapping(node, deep)


def _yaml_problem(err: Exception) -> str:
    """One line of a YAML error: the problem, where (line and column, 1-based) and its context."""
    if isinstance(err, yaml.reader.ReaderError):
        return f"{err.reason}: character #x{err.character:04x} at position {err.position + 1}"
    if not isinstance(err, yaml.MarkedYAMLError):  # e.g. ValueError: an integer of over 4300 digits
        return " ".join(str(err).split(";")[0].split())[:200] or type(err).__name__
    at = lambda mark: f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""  # noqa: E731
    text = " ".join(str(err.problem or err.context or "invalid").split()) + at(err.problem_mark)
    if err.problem and err.context:
        text += f" ({' '.join(err.context.split())}{at(err.context_mark)})"
    return text if len(text) <= 300 else text[:297] + "..."


def read_yaml(text: str):
    """The YAML text's value, by _Loader's rules; Refused on any problem."""
    loader = None
    try:
        loader = _Loader(text)  # the reader checks the characters here
        return loader.get_single_data()
    except Exception as err:  # noqa: BLE001 - PyYAML's constructors also raise ValueError, IndexError, AttributeError
        raise Refused(f"invalid YAML{'' if isinstance(err, yaml.YAMLError) else ' value'}: {_yaml_problem(err)}") \
            from None
    finally:
        if loader is not None:
            loader.dispose()
