"""Snapshots of the host's iptables/ip6tables rules and the undo of what CNI added.

A snapshot is ``iptables-save`` (and ``ip6tables-save``) of every table that exists,
parsed into chains (with policies) and rules; counters and comments are dropped. The
undo removes only what is *new* since a snapshot *and* belongs to CNI (a chain whose
name starts with ``CNI-``, a rule in such a chain or jumping to one): flushes and deletes
new CNI chains and deletes new jump rules from pre-existing chains in one
``iptables-restore --noflush`` transaction. A table that did not exist before and is
empty afterwards (iptables-nft leaves ``nat`` and its base chains behind once touched) is
deleted over netlink (:mod:`podshim_lab.nftables`). Anything else that differs is only
reported by :func:`differences`, never removed.
"""

from __future__ import annotations

import shlex
import subprocess
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from podshim_lab import nftables

__all__ = ["Snapshot", "Table", "differences", "parse_save", "snapshot", "undo_cni"]

CNI_PREFIX = "CNI-"
#: iptables' family names and their save/restore commands
COMMANDS = {
    "ipv4": ("iptables-save", "iptables-restore"),
    "ipv6": ("ip6tables-save", "ip6tables-restore"),
}


@dataclass
class Table:
    """One table of a save: chains with their policy (``-`` for user chains) and rules
    (``-A <chain> ...`` lines, in order)."""

    chains: dict[str, str] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        """Only built-in chains, all accepting, and no rule: as iptables-nft creates it."""
        return not self.rules and all(p == "ACCEPT" for p in self.chains.values())


#: family ("ipv4"/"ipv6") -> table name -> Table
Snapshot = dict[str, dict[str, Table]]


def parse_save(text: str) -> dict[str, Table]:
    """Parse ``iptables-save`` output (without ``-c``) into tables."""
    tables: dict[str, Table] = {}
    current: Table | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], Table())
        elif current is None:
            raise ValueError(f"iptables-save line outside a table: {line!r}")
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            current.chains[name] = policy
        elif line.startswith("-A "):
            current.rules.append(line)
        else:
            raise ValueError(f"unexpected iptables-save line: {line!r}")
    return tables


def _run(cmd: list[str], input_text: str | None = None) -> str:
    result = subprocess.run(
        cmd, input=input_text, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def backend() -> str:
    """``nf_tables`` or ``legacy``: what the host's ``iptables`` drives."""
    return "nf_tables" if "nf_tables" in _run(["iptables", "--version"]) else "legacy"


def snapshot() -> Snapshot:
    """Every existing table of both families."""
    return {family: parse_save(_run([save])) for family, (save, _) in COMMANDS.items()}


def _chain_of(rule: str) -> str:
    return rule.split()[1]


def _target(rule: str) -> str | None:
    words = shlex.split(rule)
    for flag in ("-j", "-g"):
        if flag in words[:-1]:
            return words[words.index(flag) + 1]
    return None


def _is_cni(rule: str) -> bool:
    target = _target(rule)
    return _chain_of(rule).startswith(CNI_PREFIX) or (
        target is not None and target.startswith(CNI_PREFIX)
    )


def _new_rules(before: Table, now: Table) -> list[str]:
    extra = Counter(now.rules) - Counter(before.rules)
    out = []
    for rule in now.rules:
        if extra[rule] > 0:
            extra[rule] -= 1
            out.append(rule)
    return out


def undo_script(table: str, before: Table, now: Table) -> str | None:
    """The ``iptables-restore --noflush`` input that removes what CNI added to ``table``
    since ``before`` (``None`` when there is nothing to remove)."""
    new_chains = [c for c in now.chains if c not in before.chains and c.startswith(CNI_PREFIX)]
    jumps = [r for r in _new_rules(before, now) if _is_cni(r) and _chain_of(r) not in new_chains]
    if not new_chains and not jumps:
        return None
    lines = [f"*{table}"]
    lines += ["-D " + rule[len("-A ") :] for rule in jumps]
    lines += [f"-F {c}" for c in new_chains]  # every new chain empty before any goes
    lines += [f"-X {c}" for c in new_chains]
    return "\n".join([*lines, "COMMIT", ""])


def undo_cni(before: Snapshot) -> list[str]:
    """Remove what CNI added since ``before``, drop tables that are new and empty; return
    the errors (what could not be done)."""
    errors: list[str] = []
    nft = backend() == "nf_tables"
    for family, (save, restore) in COMMANDS.items():
        try:
            now = parse_save(_run([save]))
            for table, contents in now.items():
                script = undo_script(table, before[family].get(table, Table()), contents)
                if script is not None:
                    _run([restore, "--noflush"], script)
            now = parse_save(_run([save]))
        except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{family}: {exc}")
            continue
        for table, contents in now.items():
            if table in before[family] or not contents.empty():
                continue
            if not nft:
                errors.append(f"{family} table {table}: new, and iptables-legacy cannot drop it")
                continue
            try:
                nftables.delete_table(family, table)
            except OSError as exc:
                errors.append(f"{family} table {table}: {exc}")
    return errors


def _table_differences(where: str, before: Table, now: Table) -> list[str]:
    out = [f"{where}: new chain {c}" for c in now.chains if c not in before.chains]
    out += [f"{where}: chain {c} is gone" for c in before.chains if c not in now.chains]
    out += [
        f"{where}: chain {c} policy {before.chains[c]} -> {p}"
        for c, p in now.chains.items()
        if c in before.chains and before.chains[c] != p
    ]
    out += [f"{where}: new rule {r}" for r in _new_rules(before, now)]
    out += [f"{where}: rule gone {r}" for r in _new_rules(now, before)]
    return out


def differences(before: Snapshot, now: Mapping[str, Mapping[str, Table]]) -> list[str]:
    """Every difference between two snapshots (``[]``: the same tables, chains, rules)."""
    out: list[str] = []
    for family in COMMANDS:
        old, new = before.get(family, {}), now.get(family, {})
        for table in sorted(set(old) | set(new)):
            where = f"{family} {table}"
            if table not in old:
                out.append(f"{where}: new table")
            elif table not in new:
                out.append(f"{where}: table is gone")
            out += _table_differences(where, old.get(table, Table()), new.get(table, Table()))
    return out
