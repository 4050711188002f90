"""Every PromQL expression the operators' side of the stack runs: the Grafana dashboards'
panel queries and the Prometheus alerting rules.

The unit test (tests/test_dashboards.py) checks their shape; the Prometheus integration test
imports `promql_expressions()` and `alert_expressions()` and runs each one against a live
stack, requiring at least one sample.

- Dashboard queries come with Grafana's variables replaced: `$__rate_interval` -> 1m,
  `$__interval` -> 15s, `$__range` -> 1h, any other variable -> `.*` (so a template variable
  may only appear inside a `=~` matcher).
- An alert's expression ends in a top-level comparison with a number (`<expr> > 5`);
  `alert_expressions()` turns it into `<expr> > bool 5`, which returns samples on a healthy
  stack too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS_DIR = ROOT / "deploy" / "grafana" / "dashboards"
ALERTS_FILE = ROOT / "deploy" / "prometheus" / "alerts.yml"

BUILTIN_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}
# $name, ${name} and ${name:format}; a name starts with a letter or "_" (so label_replace's
# "$1" is left alone).
VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::[^}]*)?\}|\$([A-Za-z_]\w*)")
# The trailing comparison of an alert: operator, then a number, then the end.
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
TRAILING_COMPARISON = re.compile(
    rf"^(?P<lhs>.*?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<num>{_NUMBER})\s*$", re.S
)


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS_DIR.glob("*.json"))


def load_dashboards() -> dict[str, dict]:
    """File name -> dashboard JSON."""
    return {path.name: json.loads(path.read_text()) for path in dashboard_files()}


def iter_panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, rows' nested (collapsed) panels included; rows themselves too."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def variable_names(expr: str) -> list[str]:
    return [m.group(1) or m.group(2) for m in VARIABLE.finditer(expr)]


def substitute_variables(expr: str) -> str:
    """The expression as the integration test runs it (Grafana's variables replaced)."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return BUILTIN_VARIABLES.get(name, ".*")

    return VARIABLE.sub(replace, expr)


def dashboard_targets() -> list[tuple[str, dict, dict, dict]]:
    """(file name, dashboard, panel, target) for every target of every panel."""
    out = []
    for name, dashboard in load_dashboards().items():
        for panel in iter_panels(dashboard.get("panels", [])):
            for target in panel.get("targets", []):
                out.append((name, dashboard, panel, target))
    return out


def promql_expressions() -> list[tuple[str, str]]:
    """(where, expression) for every dashboard query, variables substituted.

    Alert rules are not here: their raw form returns nothing on a healthy stack; see
    `alert_expressions()`.
    """
    out = []
    for name, _, panel, target in dashboard_targets():
        where = f"{name}: {panel.get('title', '?')} [{target.get('refId', '?')}]"
        out.append((where, substitute_variables(target.get("expr", ""))))
    return out


def alert_rules() -> list[dict]:
    """Every alerting rule of alerts.yml (recording rules, if any, left out)."""
    document = yaml.safe_load(ALERTS_FILE.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def _top_level_words(text: str) -> list[str]:
    """The identifiers of `text` outside parentheses, braces, brackets and strings."""
    words, depth, i = [], 0, 0
    while i < len(text):
        c = text[i]
        if c in "\"'`":
            end = i + 1
            while end < len(text) and text[end] != c:
                end += 2 if text[end] == "\\" else 1
            i = end + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and (c.isalpha() or c == "_"):
            end = i
            while end < len(text) and (text[end].isalnum() or text[end] in "_:"):
                end += 1
            words.append(text[i:end])
            i = end
            continue
        i += 1
    return words


def bool_form(expr: str) -> str:
    """`<expr> > 5` -> `<expr> > bool 5`; ValueError if the expression does not end in a
    top-level comparison with a number."""
    expr = expr.strip()
    match = TRAILING_COMPARISON.match(expr)
    if not match:
        raise ValueError(f"does not end in a comparison with a number: {expr!r}")
    lhs = match.group("lhs").rstrip()
    words = _top_level_words(lhs)
    if words and words[-1] == "bool":
        raise ValueError(f"the trailing comparison already has bool: {expr!r}")
    looser = {"and", "or", "unless"} & set(words)
    if looser:
        # `a or b > 5` is `a or (b > 5)`: the comparison would not be the top-level operator.
        raise ValueError(f"top-level {sorted(looser)} binds looser than the comparison: {expr!r}")
    return f"{lhs} {match.group('op')} bool {match.group('num')}"


def alert_expressions() -> list[tuple[str, str]]:
    """(alert name, expression in its `bool` form) for every alerting rule."""
    return [(rule["alert"], bool_form(str(rule["expr"]))) for rule in alert_rules()]
