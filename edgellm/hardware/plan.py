"""The backend plan: which llama.cpp backend runs the models here, with how many threads and
layers, and what to fall back to. A pure function of the probe and the config, so every
board's plan can be asserted from a fixture tree.

CUDA, else Vulkan, else the CPU, each only where both the hardware and the installed build
support it; the CPU always comes last, so a broken GPU driver costs speed, never service.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgellm.config import EngineConfig
from edgellm.hardware.probe import Cpu, Hardware, cpu, probe
from edgellm.modelfile.memory import Estimate
from edgellm.units import MiB

log = logging.getLogger("edgellm.hardware")

ALL_LAYERS = 999  # llama.cpp clamps n_gpu_layers to the model's layer count (+1 for the output)
_GPU_RESERVE = 256 * MiB  # of GPU memory, left for the driver and other users


@dataclass
class Step:
    backend: str  # cuda, vulkan or cpu
    device: str  # the ggml device (CUDA0, Vulkan0); "" for the CPU
    memory: int  # bytes the device can hold for a model now; 0 for the CPU
    shared: bool  # the device's memory is the system RAM (Jetson, integrated GPUs)


@dataclass
class Plan:
    steps: list[Step]  # the chosen backend first, then what a failed load retries on
    threads: int
    flash_attn: str
    reasons: list[str]  # why, in sentences
    refused: list[str] = field(default_factory=list)  # known-bad combinations, with the reason
    warnings: list[str] = field(default_factory=list)

    @property
    def backend(self) -> str:
        return self.steps[0].backend

    def gpu_layers(self, step: Step, estimate: Estimate, n_layer: int, configured: int) -> int:
        """Layers to offload on `step`: all when the model fits the device, else as many as do."""
        if step.backend == "cpu":
            return 0
        if configured >= 0:
            return configured
        if estimate.total <= step.memory:
            return ALL_LAYERS
        per_layer = (estimate.weights + estimate.kv_cache) / max(n_layer, 1)
        return max(0, min(n_layer, int((step.memory - estimate.compute) / per_layer)))

    def record(self) -> dict:
        return asdict(self)


def make_plan(hw: Hardware, engine: EngineConfig) -> Plan:
    reasons, refused, steps = [], [], []
    for gpu in hw.gpus:
        if gpu.known_bad:
            refused.append(f"{gpu.api} on {gpu.name}: {gpu.known_bad}")
    for api in ("cuda", "vulkan"):
        usable = [g for g in hw.gpus if g.api == api and not g.known_bad]
        devices = [d for d in hw.build.devices if d.api == api]
        if engine.backend not in ("auto", api):
            continue
        if not usable and engine.backend == api:
            reasons.append(f"[engine] backend = {api!r}, but no {api} GPU was found here")
        if usable and not devices:
            reasons.append(f"{usable[0].name} is here, but this llama.cpp build has no {api} support")
        if not devices or (not usable and engine.backend != api):
            continue
        for device in devices:
            shared = hw.memory.shared_with_gpu or device.kind == "igpu"
            # A Jetson's GPU memory is the system RAM: the budget is what is available, counted once.
            room = hw.memory.available if shared else device.memory_free
            steps.append(Step(api, device.name, max(room - _GPU_RESERVE, 0), shared))
        reasons.append(f"{api}: {devices[0].description} ({'shared' if steps[-1].shared else 'dedicated'} "
                       f"memory, {steps[-1].memory / MiB:.0f} MiB usable)")
    steps.append(Step("cpu", "", 0, True))
    if engine.backend == "cpu":
        reasons.append("[engine] backend = 'cpu'")
    elif steps[0].backend == "cpu" and not hw.gpus:
        reasons.append("no GPU found: the CPU runs the models")
    elif steps[0].backend == "cpu":
        reasons.append("no usable GPU backend: the CPU runs the models")

    threads = thread_count(hw.cpu, engine)
    if engine.n_threads:
        reasons.append(f"threads: {threads} ([engine] n_threads)")
    elif len(hw.cpu.clusters) > 1:
        fastest = max(hw.cpu.clusters, key=lambda c: c.max_mhz)
        reasons.append(f"threads: {threads}, the {fastest.core or 'fastest'} cores at {fastest.max_mhz} MHz "
                       f"(the slower cores would hold every step back)")
    else:
        reasons.append(f"threads: {threads}, one per physical core")
    plan = Plan(steps, threads, engine.flash_attn, reasons, refused)
    plan.warnings = warnings(hw, plan)
    return plan


def thread_count(found: Cpu, engine: EngineConfig) -> int:
    """[engine] n_threads, else one per performance core."""
    return engine.n_threads or found.performance_cores


class Planner:
    """make_plan() for this box, made when the first model loads rather than at start: asking
    llama.cpp what it can drive loads libllama and its ggml backends (CUDA's runtime on a
    Jetson), memory a server with no model loaded does without. The threads come from the
    CPU alone and are known at once. The plan and its warnings are logged when made."""

    def __init__(self, root: str | Path, engine: EngineConfig) -> None:
        self._root = Path(root)
        self._engine = engine
        self.threads = thread_count(cpu(self._root), engine)
        self._plan: Plan | None = None

    def __call__(self) -> Plan:
        """Blocks while llama.cpp's backends start: the pool calls it in its loading thread."""
        if self._plan is None:
            plan = make_plan(probe(self._root), self._engine)
            log.info("backend %s, %d threads: %s", plan.backend, plan.threads, "; ".join(plan.reasons))
            for warning in [*plan.refused, *plan.warnings]:
                log.warning("%s", warning)
            self._plan = plan
        return self._plan


def warnings(hw: Hardware, plan: Plan) -> list[str]:
    """What the operator should fix or know, most serious first."""
    found = []
    flags = hw.build.cpu_flags()
    if hw.cpu.arch == "aarch64" and "NEON" in flags:  # an ARM build: compare what it uses with the CPU
        for feature, flag in (("asimddp", "DOTPROD"), ("i8mm", "MATMUL_INT8"), ("sve", "SVE")):
            if flag in flags and feature not in hw.cpu.features:
                found.append(f"this llama.cpp build uses {flag}, which this CPU lacks: it will crash with an "
                             f"illegal instruction; install the build for this CPU (tools/cross-build)")
        if "asimddp" in hw.cpu.features and "DOTPROD" not in flags:
            found.append("this CPU has dotprod but the llama.cpp build does not use it: prompt processing runs "
                         "at a fraction of its speed; install the armv8.2 build (tools/cross-build)")
    for gpu in hw.gpus:
        if not gpu.known_bad and not hw.build.has(gpu.api):
            found.append(f"{gpu.name} is here but this llama.cpp build has no {gpu.api.upper()} support: "
                         f"the CPU does all the work (rebuild with GGML_{gpu.api.upper()}=on)")
    if hw.board.kind == "jetson" and plan.backend != "cuda":
        found.append("a Jetson running on the CPU: install a CUDA build of llama-cpp-python for the GPU's speed")
    if hw.thermal.throttled:
        detail = ", ".join(hw.thermal.flags) or f"{hw.thermal.hottest or 0:.0f} °C"
        found.append(f"the board is throttling ({detail}): improve cooling or the power supply")
    elif any("under-voltage" in f for f in hw.thermal.flags):
        found.append(f"power problems were recorded ({', '.join(hw.thermal.flags)}): use the official power supply")
    if hw.memory.available < 512 * MiB:
        found.append(f"low memory: {hw.memory.available / MiB:.0f} MiB available of "
                     f"{hw.memory.total / MiB:.0f} MiB; only the smallest models will load")
    for swap in hw.memory.swaps:
        if swap.on_sd_card:
            found.append(f"swap on the SD card ({swap.path}): it wears the card out and stalls inference; "
                         "disable it or move it to zram")
    return found
