"""nftables objects and rules as one line of nft-like text, for people: what `mtd diff`,
`mtd status` and the golden tests show. JSON where an expression is not a familiar one."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def describe(kind: str, name: str, attrs: Mapping[str, Any]) -> str:
    """nft-like text of a table object, for people."""
    if kind == "chain" and "hook" in attrs:
        return (
            f"chain {name} {{ type {attrs.get('type')} hook {attrs.get('hook')} priority "
            f"{attrs.get('prio')}; policy {attrs.get('policy', 'accept')}; }}"
        )
    if kind in ("set", "map"):
        key = attrs.get("type")
        key = " . ".join(key) if isinstance(key, list) else key
        data = f" : {attrs['map']}" if "map" in attrs else ""
        flags = f" flags {','.join(attrs['flags'])};" if attrs.get("flags") else ""
        return f"{kind} {name} {{ type {key}{data};{flags} }}"
    return f"{kind} {name}".rstrip()


def rule_text(chain: str, rule: Mapping[str, Any]) -> str:
    """A rule in nft syntax where the expression is familiar, JSON where it is not."""
    words = " ".join(_expr(e) for e in rule.get("expr", []))
    comment = f' comment "{rule["comment"]}"' if rule.get("comment") else ""
    return f"rule {chain} {words}{comment}"


def _pair(x: Any) -> str:
    """A set item: a map's `key : value` pair, or a value."""
    if isinstance(x, list) and len(x) == 2 and not isinstance(x[0], list):
        return f"{_expr(x[0])} : {_expr(x[1])}"
    return _expr(x)


def _expr(e: Any) -> str:
    if isinstance(e, str | int):
        return str(e)
    if isinstance(e, list):
        return ", ".join(_expr(x) for x in e)
    if not isinstance(e, dict) or len(e) != 1:
        return json.dumps(e)
    ((kind, v),) = e.items()
    if kind == "match":
        op = "" if v["op"] in ("==", "in") else f"{v['op']} "
        return f"{_expr(v['left'])} {op}{_expr(v['right'])}"
    if kind == "payload":
        if "base" in v:  # a raw payload, as nft writes it
            return f"@{v['base']},{v['offset']},{v['len']}"
        return f"{v['protocol']} {v['field']}"
    if kind == "jhash":
        return f"jhash {_expr(v['expr'])} mod {v['mod']} seed {v.get('seed', 0):#x}"
    if kind == "vmap":
        return f"{_expr(v['key'])} vmap {_expr(v['data'])}"
    if kind in ("jump", "goto") and isinstance(v, dict):
        return f"{kind} {v['target']}"
    if kind == "elem" and isinstance(v, dict) and "timeout" in v:
        return f"{_expr(v['val'])} timeout {v['timeout']}s"
    if kind == "set" and isinstance(v, dict) and "op" in v:  # add @set { elem }
        return f"{v['op']} {v['set']} {{ {_expr(v['elem'])} }}"
    if kind == "counter" and isinstance(v, str):
        return f'counter name "{v}"'
    if kind == "meta":
        return f"meta {v['key']}"
    if kind == "fib":
        return f"fib {' . '.join(v.get('flags', []))} {v['result']}"
    if kind == "concat":
        return " . ".join(_expr(x) for x in v)
    if kind == "map":
        return f"{_expr(v['key'])} map {_expr(v['data'])}"
    if kind == "set":
        return "{ " + ", ".join(_pair(x) for x in v) + " }"
    if kind in ("&", "|", "^"):
        return f"({_expr(v[0])} {kind} {_expr(v[1])})"
    if kind == "prefix":
        return f"{v['addr']}/{v['len']}"
    if kind in ("dnat", "snat"):
        addr = _expr(v["addr"]) if "addr" in v else ""
        port = f":{_expr(v['port'])}" if "port" in v else ""
        return f"{kind} {v.get('family', '')} to {addr}{port}".replace("  ", " ")
    if kind == "redirect":
        return f"redirect to :{_expr(v['port'])}" if v and "port" in v else "redirect"
    if kind == "mangle":
        return f"{_expr(v['key'])} set {_expr(v['value'])}"
    if kind == "ct":
        return f"ct {v['key']}"
    if kind in ("accept", "drop", "return", "notrack", "continue"):
        return kind
    return json.dumps(e, sort_keys=True)
