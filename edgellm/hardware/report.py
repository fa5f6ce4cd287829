"""`edgellm doctor`: everything probed, the plan, and the warnings, as data and as text."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from edgellm.config import EngineConfig
from edgellm.hardware.plan import make_plan
from edgellm.hardware.probe import probe
from edgellm.units import MiB


def report(root: str | Path = "/", engine: EngineConfig | None = None) -> dict:
    """The probe and the plan as JSON-ready data (doctor --json, GET /admin/hardware)."""
    hw = probe(root)
    plan = make_plan(hw, engine or EngineConfig())
    data = asdict(hw)
    data["cpu"]["performance_cores"] = hw.cpu.performance_cores
    data["thermal"]["hottest_celsius"] = hw.thermal.hottest
    data["build"]["cpu_flags"] = sorted(hw.build.cpu_flags())
    return {"hardware": data, "plan": plan.record()}


def render(data: dict) -> str:
    """The report as text for a person at a terminal."""
    hw, plan = data["hardware"], data["plan"]
    board, cpu, mem, thermal, build = hw["board"], hw["cpu"], hw["memory"], hw["thermal"], hw["build"]
    lines = ["Board", f"  {board['model']} ({board['kind']}{', Jetson Linux ' + board['l4t'] if board['l4t'] else ''})"]
    lines += ["CPU", f"  {cpu['arch']}, {cpu['physical']} physical cores ({cpu['logical']} logical), "
                     f"{cpu['performance_cores']} for inference"]
    for cluster in cpu["clusters"]:
        lines.append(f"  cores {_ranges(cluster['cpus'])}: {cluster['core'] or 'unknown'}"
                     + (f" up to {cluster['max_mhz']} MHz" if cluster["max_mhz"] else ""))
    lines.append(f"  features: {' '.join(cpu['features']) or 'none of note'}")
    lines += ["Memory", f"  {mem['available'] / MiB:.0f} MiB available of {mem['total'] / MiB:.0f} MiB"
                        + (" (shared with the GPU, counted once)" if mem["shared_with_gpu"] else "")]
    for swap in mem["swaps"]:
        lines.append(f"  swap {swap['path']}: {swap['size'] / MiB:.0f} MiB"
                     + (" on the SD card" if swap["on_sd_card"] else ""))
    lines.append("GPUs")
    for gpu in hw["gpus"]:
        lines.append(f"  {gpu['api']}: {gpu['name']}, driver {gpu['driver'] or 'unknown'}"
                     + (" (integrated)" if gpu["integrated"] else "") + (" - not usable" if gpu["known_bad"] else ""))
    if not hw["gpus"]:
        lines.append("  none")
    lines.append("Thermals")
    for zone in thermal["zones"]:
        passive = f" (throttles at {zone['passive_celsius']:.0f} °C)" if zone["passive_celsius"] else ""
        lines.append(f"  {zone['name']}: {zone['celsius']:.1f} °C{passive}")
    lines.append(f"  throttling: {'YES' if thermal['throttled'] else 'no'}"
                 + (f" ({', '.join(thermal['flags'])})" if thermal["flags"] else ""))
    lines += ["llama.cpp build", f"  GPU offload: {'yes' if build['gpu_offload'] else 'no'}"]
    for device in build["devices"]:
        memory = f", {device['memory_total'] / MiB:.0f} MiB" if device["memory_total"] else ""
        lines.append(f"  device {device['name']}: {device['description']} ({device['kind']}{memory})")
    lines.append(f"  CPU features compiled in: {' '.join(build['cpu_flags']) or 'unknown'}")
    lines += ["Plan", f"  backend: {plan['steps'][0]['backend']}"
                      + (f" ({plan['steps'][0]['device']})" if plan["steps"][0]["device"] else ""),
              f"  fallback: {' -> '.join(s['device'] or s['backend'] for s in plan['steps'])}",
              f"  threads: {plan['threads']}, flash attention: {plan['flash_attn']}"]
    lines += [f"  - {reason}" for reason in plan["reasons"]]
    lines += [f"  refused: {reason}" for reason in plan["refused"]]
    lines.append("Warnings")
    lines += [f"  ! {w}" for w in plan["warnings"]] or ["  none"]
    return "\n".join(lines)


def _ranges(cpus: list[int]) -> str:
    return f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 and cpus == list(range(cpus[0], cpus[-1] + 1)) \
        else ",".join(map(str, cpus))
