"""What this box is, read from files under a root path (tests point it at a fixture tree).

Nothing here runs a program or touches a device: it reads /proc, /sys, /dev
and /etc as text, and asks the installed llama.cpp build what it can do. So
`edgellm doctor` is safe on a box that is already in trouble, and the same
code describes a Raspberry Pi 4 fixture on an x86 workstation.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

# /proc/cpuinfo "CPU part" of the ARM cores found on edge boards.
ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE",
    "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd4b": "Cortex-A78C",
    "0xd4f": "Neoverse-V2", "0xd80": "Cortex-A520", "0xd81": "Cortex-A720",
}
# CPU features that decide how fast llama.cpp runs; the kernel's names.
ARM_FEATURES = ("asimd", "asimddp", "fphp", "asimdhp", "i8mm", "sve", "sve2", "bf16")
X86_FEATURES = ("sse3", "ssse3", "avx", "f16c", "fma", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx_vnni", "amx_int8")
# Pi firmware's get_throttled bits.
PI_THROTTLE_BITS = {0: "under-voltage now", 1: "ARM frequency capped now", 2: "throttled now",
                    3: "soft temperature limit now", 16: "under-voltage has occurred",
                    17: "frequency capping has occurred", 18: "throttling has occurred",
                    19: "soft temperature limit has occurred"}


@dataclass
class Board:
    kind: str  # raspberry-pi, jetson or generic
    model: str
    compatible: list[str] = field(default_factory=list)
    l4t: str = ""  # Jetson Linux release, e.g. "R36.3.0"


@dataclass
class Cluster:
    """CPUs that share a maximum frequency: a big.LITTLE board has two."""

    cpus: list[int]
    max_mhz: int
    core: str  # Cortex-A76, or the x86 model name
    cores: int = 0  # physical cores (fewer than cpus with SMT)


@dataclass
class Cpu:
    arch: str  # aarch64, armv7l, x86_64
    features: list[str]  # those in ARM_FEATURES / X86_FEATURES that the CPU has
    logical: int
    physical: int
    clusters: list[Cluster]

    @property
    def performance_cores(self) -> int:
        """Physical cores of the fastest cluster (all of them when the cores are alike)."""
        if len(self.clusters) < 2:
            return self.physical
        return max(1, max(self.clusters, key=lambda c: c.max_mhz).cores)


@dataclass
class Swap:
    path: str
    size: int
    on_sd_card: bool


@dataclass
class Memory:
    total: int
    available: int
    swaps: list[Swap]
    shared_with_gpu: bool  # a Jetson's GPU uses the same RAM: count it once


@dataclass
class Gpu:
    api: str  # cuda or vulkan: what llama.cpp would drive it with
    name: str
    driver: str  # the driver's name and version, when the files say
    integrated: bool
    known_bad: str = ""  # why llama.cpp must not use it, if so


@dataclass
class Zone:
    name: str
    celsius: float
    passive_celsius: float | None  # where the kernel starts to throttle, if it says


@dataclass
class Thermal:
    zones: list[Zone]
    flags: list[str]  # the Pi firmware's throttling flags that are set
    throttled: bool

    @property
    def hottest(self) -> float | None:
        return max((z.celsius for z in self.zones), default=None)


@dataclass
class Device:
    """A ggml backend device of the installed llama.cpp build."""

    name: str  # CPU, CUDA0, Vulkan0
    description: str
    kind: str  # cpu, gpu, igpu, accel
    memory_free: int
    memory_total: int

    @property
    def api(self) -> str:
        return re.sub(r"\d+$", "", self.name).lower()


@dataclass
class Build:
    """What the installed llama.cpp can do."""

    gpu_offload: bool
    devices: list[Device]
    system_info: str  # llama_print_system_info(): the CPU features compiled in, and more

    def has(self, api: str) -> bool:
        return any(d.api == api for d in self.devices)

    def cpu_flags(self) -> set[str]:
        """The CPU features compiled in (NEON, DOTPROD, AVX2, ...)."""
        return {k.strip() for k, v in re.findall(r"([A-Z0-9_]+) = (\d)", self.system_info) if v == "1"}


@dataclass
class Hardware:
    board: Board
    cpu: Cpu
    memory: Memory
    gpus: list[Gpu]
    thermal: Thermal
    build: Build


def probe(root: str | Path = "/", build: Build | None = None) -> Hardware:
    """Everything at once; `build` defaults to the installed llama.cpp's."""
    root = Path(root)
    found = board(root)
    return Hardware(board=found, cpu=cpu(root), memory=memory(root, found), gpus=gpus(root, found),
                    thermal=thermal(root), build=build or installed_build())


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _int(path: Path) -> int | None:
    text = _read(path).strip()
    try:
        return int(text, 0)
    except ValueError:
        return None


def board(root: Path) -> Board:
    model = _read(root / "proc/device-tree/model").strip("\0\n ")
    compatible = [c for c in _read(root / "proc/device-tree/compatible").split("\0") if c]
    release = _read(root / "etc/nv_tegra_release")
    if release or any(c.startswith("nvidia,tegra") for c in compatible):
        match = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", release)
        return Board("jetson", model or "NVIDIA Jetson", compatible, f"R{match[1]}.{match[2]}" if match else "")
    if model.startswith("Raspberry Pi") or any(c.startswith("raspberrypi,") for c in compatible):
        return Board("raspberry-pi", model, compatible)
    if not model:
        vendor = _read(root / "sys/class/dmi/id/sys_vendor").strip()
        product = _read(root / "sys/class/dmi/id/product_name").strip()
        model = " ".join(p for p in (vendor, product) if p) or "unknown"
    return Board("generic", model, compatible)


def cpu(root: Path) -> Cpu:
    text = _read(root / "proc/cpuinfo")
    blocks: list[dict[str, str]] = [dict(re.findall(r"^([^:\n]+?)\s*:\s*(.*)$", b, re.M))
                                    for b in text.split("\n\n") if b.strip()]
    processors = [b for b in blocks if "processor" in b]
    flags = set(next((found for b in processors if (found := b.get("Features") or b.get("flags"))), "").split())
    if root == Path("/"):
        arch = platform.machine()
    elif any("Features" in b for b in processors):
        arch = "aarch64" if any(b.get("CPU architecture") == "8" for b in processors) else "armv7l"
    else:
        arch = "x86_64"
    if "pni" in flags:  # the kernel's name for SSE3
        flags.add("sse3")
    known = ARM_FEATURES if arch.startswith(("aarch64", "arm")) else X86_FEATURES
    features = [f for f in known if f in flags]
    if arch.startswith("arm") and "neon" in flags:  # 32-bit kernels call it neon
        features.insert(0, "asimd")

    ids = [int(b["processor"]) for b in processors if re.fullmatch(r"[0-9]+", b["processor"])] or [0]
    cores: set[tuple[int | None, ...]] = set()
    groups: dict[int, Cluster] = {}
    cluster_cores: dict[int, set[tuple[int | None, ...]]] = {}
    for n in ids:
        topology = root / f"sys/devices/system/cpu/cpu{n}/topology"
        core_id = _int(topology / "core_id")
        # Newer arm64 kernels restart core_id in each cluster: the cluster (or die) tells them apart.
        key = (_int(topology / "physical_package_id"), _int(topology / "cluster_id"), _int(topology / "die_id"),
               core_id if core_id is not None else n)
        cores.add(key)
        khz = _int(root / f"sys/devices/system/cpu/cpu{n}/cpufreq/cpuinfo_max_freq") or 0
        block = next((b for b in processors if b["processor"] == str(n)), {})
        core = ARM_PARTS.get(block.get("CPU part", ""), block.get("CPU part", "")) or block.get("model name", "")
        groups.setdefault(khz, Cluster([], khz // 1000, core)).cpus.append(n)
        cluster_cores.setdefault(khz, set()).add(key)
    for khz, cluster in groups.items():
        cluster.cores = len(cluster_cores[khz])
    clusters = sorted(groups.values(), key=lambda c: c.max_mhz)
    return Cpu(arch=arch, features=features, logical=len(ids), physical=len(cores), clusters=clusters)


def memory(root: Path, board: Board) -> Memory:
    info = {k: int(v) * 1024 for k, v in re.findall(r"^(\w+):\s+(\d+) kB", _read(root / "proc/meminfo"), re.M)}
    mounts = [line.split()[:2] for line in _read(root / "proc/mounts").splitlines() if len(line.split()) > 2]
    swaps = []
    for line in _read(root / "proc/swaps").splitlines()[1:]:
        parts = line.split()
        if len(parts) < 3:
            continue
        try:
            path, kind, size = parts[0], parts[1], int(parts[2]) * 1024
        except ValueError:
            continue
        device = path
        if kind == "file":  # the device of the longest mount point holding the file
            holders = [m for m in mounts if path.startswith(m[1].rstrip("/") + "/")]
            device = max(holders, key=lambda m: len(m[1]))[0] if holders else ""
        swaps.append(Swap(path, size, "mmcblk" in device))
    jetson = board.kind == "jetson"
    return Memory(total=info.get("MemTotal", 0), available=info.get("MemAvailable", info.get("MemFree", 0)),
                  swaps=swaps, shared_with_gpu=jetson)


def gpus(root: Path, board: Board) -> list[Gpu]:
    found = []
    dev = root / "dev"
    if (dev / "nvhost-ctrl-gpu").exists() or (dev / "nvhost-gpu").exists():
        release = board.l4t
        found.append(Gpu("cuda", _jetson_gpu(board.compatible), f"nvgpu (Jetson Linux {release})"
                         if release else "nvgpu", integrated=True))
    elif any(dev.glob("nvidia[0-9]*")):
        version = re.search(r"Kernel Module(?: for \w+)?\s+([\d.]+)", _read(root / "proc/driver/nvidia/version"))
        for info in sorted((root / "proc/driver/nvidia/gpus").glob("*/information")):
            model = re.search(r"^Model:\s*(.+)$", _read(info), re.M)
            found.append(Gpu("cuda", model[1].strip() if model else "NVIDIA GPU",
                             f"nvidia {version[1]}" if version else "nvidia", integrated=False))
        if not found:
            found.append(Gpu("cuda", "NVIDIA GPU", f"nvidia {version[1]}" if version else "nvidia", False))
    if _vulkan_loader(root):
        for node in sorted((dev / "dri").glob("renderD*")):
            driver = re.search(r"^DRIVER=(\S+)", _read(root / f"sys/class/drm/{node.name}/device/uevent"), re.M)
            name = driver[1] if driver else "unknown"
            bad = ""
            if name in ("v3d", "vc4"):
                bad = ("the Raspberry Pi's V3D GPU: llama.cpp's Vulkan backend does not run on it "
                       "(missing features), so it would only fail or crawl")
            found.append(Gpu("vulkan", f"{name} ({node.name})", name, integrated=name not in ("amdgpu", "nouveau",
                                                                                             "nvidia"),
                             known_bad=bad))
    return found


def _jetson_gpu(compatible: list[str]) -> str:
    soc = next((c.split(",")[1] for c in compatible if c.startswith("nvidia,tegra")), "")
    return {"tegra234": "Orin (Ampere, sm_87)", "tegra194": "Xavier (Volta, sm_72)",
            "tegra210": "TX1/Nano (Maxwell, sm_53)"}.get(soc, f"Jetson GPU {soc}".strip())


def _vulkan_loader(root: Path) -> bool:
    return any(root.glob("usr/lib/*/libvulkan.so.1")) or any(root.glob("usr/lib/libvulkan.so.1")) \
        or any(root.glob("usr/lib64/libvulkan.so.1"))


def thermal(root: str | Path = "/") -> Thermal:
    root = Path(root)
    zones = []
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
        milli = _int(zone / "temp")
        if milli is None:
            continue
        passive = None
        for trip in sorted(zone.glob("trip_point_*_type")):
            if _read(trip).strip() == "passive":
                value = _int(trip.with_name(trip.name.replace("_type", "_temp")))
                passive = value / 1000 if value else None
                break
        zones.append(Zone(_read(zone / "type").strip() or zone.name, milli / 1000, passive))
    try:  # hex digits without 0x, as the firmware driver writes them
        bits = int(_read(root / "sys/devices/platform/soc/soc:firmware/get_throttled").strip() or "0", 16)
    except ValueError:
        bits = 0
    flags = [text for bit, text in PI_THROTTLE_BITS.items() if bits and bits >> bit & 1]
    hot = any(z.passive_celsius is not None and z.celsius >= z.passive_celsius for z in zones)
    return Thermal(zones, flags, throttled=hot or bool(bits and bits & 0b1110))


_DEVICE_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


def installed_build() -> Build:
    """Ask the installed llama.cpp (through ggml's device registry) what it can drive."""
    import llama_cpp._ggml as ggml
    import llama_cpp.llama_cpp as C

    C.llama_backend_init()
    lib = ggml.libggml
    base = ctypes.CDLL(os.path.join(os.path.dirname(ggml.__file__), "lib", "libggml-base.so"))
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(base, name).restype = ctypes.c_char_p
        getattr(base, name).argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    size = ctypes.POINTER(ctypes.c_size_t)
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, size, size]
    devices = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append(Device(base.ggml_backend_dev_name(dev).decode(), base.ggml_backend_dev_description(dev).decode(),
                              _DEVICE_KINDS.get(base.ggml_backend_dev_type(dev), "other"), free.value, total.value))
    return Build(bool(C.llama_supports_gpu_offload()), devices, C.llama_print_system_info().decode())
