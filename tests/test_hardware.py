"""The hardware probe and the backend plan: fixture trees of real boards, the real probe here,
the fallback from a failing GPU load, thermals while serving, and `edgellm doctor`."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import ROOT, wait_until
from test_cli import assert_one_line_error, edgellm

from edgellm.config import EngineConfig, ModelsConfig
from edgellm.engine.pool import Pool
from edgellm.hardware.plan import ALL_LAYERS, Plan, Step, make_plan
from edgellm.hardware.probe import Build, Device, probe
from edgellm.modelfile.memory import Estimate
from edgellm.store.registry import ModelFile, describe
from edgellm.units import MiB

FIXTURES = ROOT / "tests" / "fixtures" / "hardware"
GiB = 1 << 30

# Builds as llama.cpp describes itself on each kind of board (llama_print_system_info, ggml devices).
ARM_V80 = "CPU : NEON = 1 | ARM_FMA = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
ARM_V82 = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
X86 = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | OPENMP = 1 | REPACK = 1 | "


def cpu_build(info: str) -> Build:
    return Build(False, [Device("CPU", "CPU", "cpu", 0, 0)], info)


def gpu_build(info: str, name: str, description: str, kind: str, free: int) -> Build:
    return Build(True, [Device(name, description, kind, free, free + GiB), Device("CPU", "CPU", "cpu", 0, 0)], info)


def plan_for(board: str, build: Build, **engine) -> tuple[Plan, object]:
    hw = probe(FIXTURES / board, build)
    return make_plan(hw, EngineConfig(**engine)), hw


def small() -> Estimate:  # Gemma 3 270M at n_ctx 4096
    return Estimate(weights=260 * MiB, kv_cache=50 * MiB, compute=80 * MiB)


def test_pi4_runs_on_its_a72_cores_and_refuses_vulkan_on_v3d():
    vulkan = gpu_build(ARM_V80, "Vulkan0", "V3D 4.2.14.0", "igpu", 3 * GiB)
    for build in (cpu_build(ARM_V80), vulkan):
        plan, hw = plan_for("pi4", build)
        assert hw.board.kind == "raspberry-pi" and hw.board.model == "Raspberry Pi 4 Model B Rev 1.4"
        assert hw.cpu.arch == "aarch64" and hw.cpu.features == ["asimd"]
        assert hw.cpu.clusters[0].core == "Cortex-A72" and hw.cpu.clusters[0].max_mhz == 1800
        assert [s.backend for s in plan.steps] == ["cpu"] and plan.threads == 4
        assert any("V3D" in r and "does not run" in r for r in plan.refused)
        assert any("swap on the SD card (/var/swap)" in w for w in plan.warnings)
    plan, _ = plan_for("pi4", cpu_build(ARM_V82))
    assert any("DOTPROD, which this CPU lacks" in w and "illegal instruction" in w for w in plan.warnings)


def test_pi5_throttling_and_a_build_without_dotprod():
    plan, hw = plan_for("pi5", cpu_build(ARM_V82))
    assert hw.cpu.features == ["asimd", "asimddp", "fphp", "asimdhp"]
    assert hw.cpu.clusters[0].core == "Cortex-A76" and plan.backend == "cpu" and plan.threads == 4
    assert hw.thermal.throttled and hw.thermal.hottest == pytest.approx(85.35)
    assert "throttled now" in hw.thermal.flags and "under-voltage now" not in hw.thermal.flags
    assert any(w.startswith("the board is throttling") for w in plan.warnings)
    assert not any("swap" in w for w in plan.warnings)  # zram is not the SD card
    assert not any("dotprod" in w.lower() for w in plan.warnings)
    plan, _ = plan_for("pi5", cpu_build(ARM_V80))
    assert any("has dotprod but the llama.cpp build does not use it" in w for w in plan.warnings)


def test_jetson_orin_nano_uses_cuda_in_shared_memory():
    cuda = gpu_build(ARM_V82, "CUDA0", "Orin", "gpu", 6 * GiB)
    plan, hw = plan_for("jetson-orin-nano", cuda)
    assert hw.board.kind == "jetson" and hw.board.l4t == "R36.3.0"
    assert hw.memory.shared_with_gpu and hw.gpus[0].name.startswith("Orin") and hw.gpus[0].integrated
    assert [s.backend for s in plan.steps] == ["cuda", "cpu"] and plan.threads == 6
    step = plan.steps[0]
    # The GPU's memory is the system RAM, counted once: what is available, not RAM + GPU.
    assert step.shared and step.memory == hw.memory.available - 256 * MiB
    assert plan.gpu_layers(step, small(), 18, -1) == ALL_LAYERS
    huge = Estimate(weights=12 * GiB, kv_cache=2 * GiB, compute=512 * MiB)
    partial = plan.gpu_layers(step, huge, 40, -1)
    assert 0 < partial < 40
    assert plan.warnings == []

    plan, _ = plan_for("jetson-orin-nano", cpu_build(ARM_V82))  # a CPU-only wheel on a Jetson
    assert plan.backend == "cpu"
    assert any("no CUDA support" in w for w in plan.warnings)
    assert any("a Jetson running on the CPU" in w for w in plan.warnings)


def test_x86_with_an_nvidia_gpu():
    cuda = gpu_build(X86, "CUDA0", "NVIDIA GeForce RTX 4070", "gpu", 11 * GiB)
    plan, hw = plan_for("x86-nvidia", cuda)
    assert hw.gpus[0].name == "NVIDIA GeForce RTX 4070" and hw.gpus[0].driver == "nvidia 550.54.14"
    assert hw.cpu.physical == 8 and hw.cpu.logical == 16 and "avx2" in hw.cpu.features
    assert [s.device for s in plan.steps] == ["CUDA0", ""] and plan.threads == 8
    step = plan.steps[0]
    assert not step.shared and step.memory == 11 * GiB - 256 * MiB
    assert plan.gpu_layers(step, small(), 18, -1) == ALL_LAYERS
    assert plan.gpu_layers(step, Estimate(16 * GiB, 2 * GiB, GiB), 48, -1) == int((step.memory - GiB) / (18 * GiB / 48))
    # Every choice can be forced.
    assert plan.gpu_layers(step, small(), 18, 10) == 10
    forced, _ = plan_for("x86-nvidia", cuda, backend="cpu", n_threads=3)
    assert forced.backend == "cpu" and forced.threads == 3
    # The same box with a CPU-only build says what it is missing.
    plan, _ = plan_for("x86-nvidia", cpu_build(X86))
    assert plan.backend == "cpu" and any("no CUDA support" in w and "GGML_CUDA" in w for w in plan.warnings)


def test_x86_cpu_only():
    plan, hw = plan_for("x86-cpu", cpu_build(X86))
    assert hw.gpus == [] and hw.cpu.physical == 6 and plan.threads == 6 and plan.warnings == []
    assert plan.reasons[0] == "no GPU found: the CPU runs the models"
    # Forcing a GPU backend that is not here explains itself and still serves on the CPU.
    plan, _ = plan_for("x86-cpu", cpu_build(X86), backend="vulkan")
    assert plan.backend == "cpu" and any("no vulkan GPU was found" in r for r in plan.reasons)


def test_big_little_arm_without_dotprod_uses_the_big_cores():
    plan, hw = plan_for("arm-no-dotprod", cpu_build(ARM_V80))
    assert [(c.core, c.max_mhz, len(c.cpus)) for c in hw.cpu.clusters] == [("Cortex-A53", 1416, 4),
                                                                          ("Cortex-A72", 1800, 2)]
    assert "asimddp" not in hw.cpu.features and plan.threads == 2
    assert any("Cortex-A72" in r for r in plan.reasons) and plan.warnings == []


def test_the_real_probe_on_this_machine():
    hw = probe()
    plan = make_plan(hw, EngineConfig())
    assert hw.build.devices[0].name == "CPU" and hw.build.system_info.startswith("CPU :")
    assert hw.cpu.physical == psutil.cpu_count(logical=False)
    assert abs(hw.memory.total - psutil.virtual_memory().total) < 64 * MiB
    assert plan.backend == "cpu" and plan.threads == psutil.cpu_count(logical=False)


def test_doctor_text_and_json(tmp_path):
    text = edgellm("doctor", "--hardware-root", str(FIXTURES / "pi5"))
    assert text.returncode == 0, text.stderr
    for fragment in ("Raspberry Pi 5 Model B Rev 1.0 (raspberry-pi)", "Cortex-A76 up to 2400 MHz",
                     "throttling: YES", "backend: cpu", "refused: vulkan on v3d"):
        assert fragment in text.stdout
    data = json.loads(edgellm("doctor", "--json", "--hardware-root", str(FIXTURES / "jetson-orin-nano")).stdout)
    assert data["hardware"]["board"]["kind"] == "jetson" and data["hardware"]["memory"]["shared_with_gpu"]
    assert data["plan"]["threads"] == 6
    here = json.loads(edgellm("doctor", "--json").stdout)
    assert here["plan"]["steps"][-1]["backend"] == "cpu"
    assert_one_line_error(edgellm("doctor", "--hardware-root", str(tmp_path / "nope")), "--hardware-root")


def test_a_failed_gpu_load_falls_back_to_the_cpu(models, caplog):
    """A plan whose GPU the llama.cpp build cannot drive: the load fails there for real and
    succeeds on the CPU, with the reason logged."""
    path = models["scripted"]
    entry = describe([path], model_id="scripted", source="test",
                     files=[ModelFile(path.name, "", path.stat().st_size)])
    plan = Plan([Step("cuda", "CUDA0", 8 * GiB, False), Step("cpu", "", 0, True)], threads=1, flash_attn="auto",
                reasons=[])

    async def load() -> tuple[str, str]:
        pool = Pool(EngineConfig(n_threads=1), ModelsConfig(), plan=lambda: plan, extra=[entry])
        await pool.start()
        lease = await pool.acquire("scripted")
        try:
            return lease.loaded.backend, pool.find("scripted").phase
        finally:
            lease.release()
            await pool.close()

    with caplog.at_level(logging.WARNING, "edgellm.engine"):
        assert asyncio.run(load()) == ("cpu", "loaded")
    assert "loading model scripted on CUDA0 failed (this llama.cpp build has no device CUDA0); trying cpu" \
        in caplog.text


def metric(server, name: str) -> float | None:
    match = re.search(rf"^{name} (\S+)$", server.get("/metrics").text, re.M)
    return float(match[1]) if match else None


def test_throttling_shows_everywhere_and_halves_the_threads(server_factory, models, tmp_path):
    board = tmp_path / "pi5"
    shutil.copytree(FIXTURES / "pi5", board)
    server = server_factory(models["scripted"], args=("--hardware-root", str(board)),
                            config="[engine]\nthrottle_threads = true\n")
    assert metric(server, "edgellm_throttled") == 1.0 and metric(server, "edgellm_threads") == 2.0
    assert 'edgellm_temperature_celsius{zone="cpu-thermal"} 85.35' in server.get("/metrics").text
    health = server.get("/health").json()
    assert health["throttled"] is True and "throttled now" in health["throttle_flags"]
    assert server.post("/v1/completions", {"prompt": " Hello", "max_tokens": 4}).json()["choices"][0]["text"] \
        == " world!"

    (board / "sys/devices/platform/soc/soc:firmware/get_throttled").write_text("0\n")
    (board / "sys/class/thermal/thermal_zone0/temp").write_text("61000\n")
    wait_until(lambda: metric(server, "edgellm_throttled") == 0.0, 10, message="the throttling to clear")
    assert metric(server, "edgellm_threads") == 4.0
    health = server.get("/health").json()
    assert {k: health[k] for k in ("status", "throttled", "temperature_celsius")} == {
        "status": "ok", "throttled": False, "temperature_celsius": 61.0}
    assert "throttle_flags" not in health and health["memory"]["budget"] > 0
    assert server.post("/v1/completions", {"prompt": " Hello", "max_tokens": 4}).status_code == 200

    hardware = server.get("/admin/hardware").json()
    assert hardware["hardware"]["board"]["model"] == "Raspberry Pi 5 Model B Rev 1.0"
    assert hardware["plan"]["threads"] == 4 and hardware["plan"]["steps"][0]["backend"] == "cpu"
    assert httpx.get(server.url + "/admin/models").json()["data"][0]["backend"] == "cpu"


def test_probe_survives_odd_files(tmp_path):
    """A box with unreadable or odd files still gets a report and a plan, never an exception."""
    root = tmp_path / "odd"
    shutil.copytree(FIXTURES / "pi4", root)
    (root / "proc/swaps").write_text("Filename Type Size Used Priority\n/swapfile file lots 0 -2\n")
    (root / "proc/cpuinfo").write_text("processor\t: ²\nFeatures\t: fp asimd\n\n")
    (root / "sys/class/thermal/thermal_zone0/temp").write_text("hot\n")
    (root / "sys/devices/platform/soc/soc:firmware/get_throttled").write_text("zz\n")
    plan, hw = plan_for_root(root)
    assert plan.backend == "cpu" and plan.threads >= 1 and hw.memory.swaps == []


def plan_for_root(root: Path):
    hw = probe(root, cpu_build(ARM_V80))
    return make_plan(hw, EngineConfig()), hw
