"""What `nixos-rebuild switch` does to the units of one systemd manager, by the rules of
NixOS' switch-to-configuration-ng (its compare_units and handle_modified_unit), applied to
unit files as rendered (name -> text, drop-ins as `<unit>.d/<name>.conf`).

The rules, for a unit active before the switch:

- gone from the new configuration: stopped, unless `X-StopOnRemoval=false` in [Unit];
- unchanged, or changed only in [Unit] keys that do not matter (Description=,
  StopWhenUnneeded=, …): nothing; changed only in `X-Reload-Triggers=`: reloaded;
- a changed socket: nothing (switch-to-configuration leaves changed sockets alone);
- a changed service: reloaded with `X-ReloadIfChanged=true` in [Service]; left alone with
  `X-RestartIfChanged=false` in [Service], `RefuseManualStop=` or `X-OnlyManualStart=`;
  restarted with `X-StopIfChanged=false`; else stopped before the activation script and
  started after it, except that a socket-activated service (one whose `Sockets=`, or else
  `<unit>.socket`, is active) is only stopped and its sockets are stopped and started.

Targets, slices, mounts and units new in the configuration are outside this model.
"""

from __future__ import annotations

from collections.abc import Mapping

UnitInfo = dict[str, dict[str, list[str]]]

# [Unit] keys whose change does not restart a unit (compare_units' unit_section_ignores).
UNIT_IGNORES = frozenset(
    {
        "X-Reload-Triggers",
        "Description",
        "Documentation",
        "OnFailure",
        "OnSuccess",
        "OnFailureJobMode",
        "IgnoreOnIsolate",
        "StopWhenUnneeded",
        "RefuseManualStart",
        "RefuseManualStop",
        "AllowIsolate",
        "CollectMode",
        "SourcePath",
    }
)

# What happens to a unit: nothing, or some of these, in this order.
VERBS = ("stop", "start", "restart", "reload")
LEFT_ALONE = "left alone"


def parse(text: str, into: UnitInfo | None = None) -> UnitInfo:
    """Sections of a unit file, each key with all its values; an empty value clears the
    key's earlier ones (a drop-in's `ExecStart=`). [Install] is dropped, as switch does."""
    info: UnitInfo = into if into is not None else {}
    section: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1]
            section = None if name == "Install" else info.setdefault(name, {})
            continue
        if section is None or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if value == "":
            section[key] = []
        else:
            section.setdefault(key, []).append(value)
    return info


def unit_info(files: Mapping[str, str], unit: str) -> UnitInfo:
    """A unit's file and then its drop-ins, by name."""
    info = parse(files[unit])
    for name in sorted(n for n in files if n.startswith(f"{unit}.d/") and n.endswith(".conf")):
        parse(files[name], info)
    return info


def flag(info: UnitInfo, section: str, key: str, default: bool) -> bool:
    values = info.get(section, {}).get(key)
    if not values:
        return default
    return values[-1] in ("1", "yes", "true", "on")


def compare(old: UnitInfo, new: UnitInfo) -> str:
    """`equal`, `reload` (only X-Reload-Triggers= changed) or `restart`."""
    result = "equal"
    for section in old.keys() | new.keys():
        before, after = old.get(section, {}), new.get(section, {})
        for key in before.keys() | after.keys():
            if before.get(key) == after.get(key):
                continue
            if section == "Unit" and key == "X-Reload-Triggers":
                result = "reload"
            elif section != "Unit" or key not in UNIT_IGNORES:
                return "restart"
    return result


def plan(
    old: Mapping[str, str], new: Mapping[str, str], active: set[str]
) -> dict[str, tuple[str, ...] | str]:
    """For every active unit of `old` that a switch to `new` touches or leaves alone despite a
    change: its verbs in order, or LEFT_ALONE."""
    actions: dict[str, list[str]] = {}
    skipped: set[str] = set()

    def add(unit: str, verb: str) -> None:
        verbs = actions.setdefault(unit, [])
        if verb not in verbs:
            verbs.append(verb)

    for unit in sorted(active):
        if unit not in new:
            if flag(unit_info(old, unit), "Unit", "X-StopOnRemoval", True):
                add(unit, "stop")
            continue
        before, after = unit_info(old, unit), unit_info(new, unit)
        comparison = compare(before, after)
        if comparison == "equal":
            continue
        if comparison == "reload":
            add(unit, "reload")
            continue
        if unit.endswith(".socket"):
            skipped.add(unit)
        elif flag(after, "Service", "X-ReloadIfChanged", False):
            add(unit, "reload")
        elif (
            not flag(after, "Service", "X-RestartIfChanged", True)
            or flag(after, "Unit", "RefuseManualStop", False)
            or flag(after, "Unit", "X-OnlyManualStart", False)
        ):
            skipped.add(unit)
        elif not flag(after, "Service", "X-StopIfChanged", True):
            add(unit, "restart")
        else:
            sockets = " ".join(after.get("Service", {}).get("Sockets", [])).split()
            sockets = sockets or [unit.removesuffix(".service") + ".socket"]
            activated = False
            for socket in sockets:
                if socket in active:
                    add(socket, "stop")
                    if socket in new:
                        add(socket, "start")
                        activated = True
            if flag(after, "Service", "X-NotSocketActivated", False):
                activated = False
            add(unit, "stop")
            if not activated:
                add(unit, "start")
    result: dict[str, tuple[str, ...] | str] = {
        unit: tuple(sorted(verbs, key=VERBS.index)) for unit, verbs in actions.items()
    }
    for unit in skipped - result.keys():
        result[unit] = LEFT_ALONE
    return result
