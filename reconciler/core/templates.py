"""What each shipped template supports, in one table that validation reads.

Pure. A template not listed (a user's own) declares no limit: mtd cannot know what it
handles, and the kernel still refuses what it cannot load. A listed template's limits turn
into one line per problem, naming the key, instead of a ruleset that silently skips sources.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_FAMILIES = frozenset({4, 6})
ALL_PROTOCOLS = frozenset({"tcp", "udp"})
ALL_FEATURES = frozenset({"addresses", "prefixes", "per_source", "trusted", "tripwire"})


@dataclass(frozen=True)
class Support:
    """Families (4, 6), protocols and features it renders: source kinds (`addresses`,
    `prefixes`, `per_source` entries), `trusted` and the `tripwire`."""

    families: frozenset[int] = ALL_FAMILIES
    protocols: frozenset[str] = ALL_PROTOCOLS
    features: frozenset[str] = ALL_FEATURES
    instead: str = ""  # what to use when a limit is hit

    def families_text(self) -> str:
        return " and ".join(f"IPv{f}" for f in sorted(self.families))

    def protocols_text(self) -> str:
        return "/".join(p.upper() for p in sorted(self.protocols))


TEMPLATES: dict[str, Support] = {
    "maps": Support(),
    # The proof of concept's shape: one rule per moved port, IPv4 TCP only.
    "classic": Support(
        families=frozenset({4}),
        protocols=frozenset({"tcp"}),
        features=frozenset({"addresses", "prefixes"}),
        instead="use template: maps",
    ),
}


def support(name: str) -> Support:
    return TEMPLATES.get(name, _UNDECLARED)


_UNDECLARED = Support()
