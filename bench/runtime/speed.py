"""Throughput, measured like timm's ``benchmark.py``, with a protocol whose figures repeat.

Every model is timed on synthetic input at the evaluation resolution, ``model.eval()`` +
``torch.inference_mode()``, with a device synchronisation before the clock stops (only on
devices that need one).  The protocol (``docs/speed.md``):

1. **warm-up**: ``warmup`` iterations per model (the first call of a ``torch.compile``d model
   compiles it; its duration is reported as ``first_call_s``); the last warm-up iteration runs
   under ``torch.profiler`` to record which attention kernel served the model (``attn_kernel``,
   ``fused_sdpa``), so no extra forward is spent on that check;
2. **calibration**: one timed iteration per model sets its iteration count so that one timing
   lasts at least ``min_time`` seconds (at least ``min_iters`` iterations), like timm's
   benchmark, which times many iterations on a GPU; ``iters`` fixes the count instead;
3. **interleaved repeats**: ``repeats`` rounds; in each round every model is timed once, and the
   baseline is timed before and after every chunk of ``pair_every`` other models (default: all
   of them), the direction alternating between rounds
   (``B c1 c2 .. cK B cK .. c1 B c1 ..``: adjacent rounds share the baseline timing between them);
4. **speed-up**: per round, ``t_baseline / t_model`` with ``t_baseline`` the mean of the two
   baseline timings that bracket the model's timing; the reported speed-up is the median of these
   per-pair ratios, with their min/max/IQR and a seeded bootstrap interval of the median
   (``bootstrap`` resamples, 95%); a row whose interval leaves ±``noisy_pct``% of the median is
   flagged ``noisy``;
5. **host load**: around every timing the busy CPU time of the CPUs this process may run on
   (``/proc/stat``, steal included) is read together with this process's own CPU time; what the host spent on other
   processes or lost to the hypervisor (steal), as a share of those CPUs' time over the timing,
   is that timing's ``host_load``.  A timing above ``contention_pct`` is *contended*: the pairs it
   belongs to are left out of the speed-up (as long as at least ``min_clean_pairs`` pairs remain; else
   every pair is kept and the row says so), and a row that lost pairs gets the extra rounds of a noisy
   row.  Where ``/proc/stat`` does not exist nothing is left out;
6. **unsteady pairs**: a pair whose two bracketing baseline timings differ by more than ``bracket_pct``
   of their mean (the machine changed speed during it, which ``/proc/stat`` does not show) is left out
   the same way.  The output's ``timings`` keeps every timing in order, so ``row_speedup`` can
   recompute a row under other settings.

Images/s per model: median (min, max, IQR, bootstrap interval) over its uncontended timings.  Data loading is
never timed (ToMe#11, DynamicViT#31).

Allocator (CPU): glibc's malloc returns large blocks to the system and maps them again on the
next allocation, so every forward pays tens of thousands of page faults whose number depends on
what ran before in the process (measured: 32k faults per DeiT-S batch-8 forward in one history,
none in another).  That made speed-ups shift between processes.  ``allocator="steady"`` (default)
fixes glibc's mmap and trim thresholds before timing (``mallopt``), the effect jemalloc/tcmalloc
give, so every model runs from a warm heap; ``"system"`` leaves malloc alone.  The setting is
process-wide and recorded in the output's ``config``.

Precision: ``fp32``; ``amp`` = autocast float16 on CUDA (timm's ``--amp``), bfloat16 on CPU,
where float16 autocast is not a fast path (the output says which); ``bf16`` = autocast bfloat16.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.runtime import env


@dataclass
class SpeedConfig:
    batch_size: int = 16
    precision: str = "fp32"
    device: str = "cpu"
    warmup: Optional[int] = None  # warm-up iterations per model (default 2 CPU, 10 CUDA)
    iters: Optional[int] = None  # fixed timed iterations per timing; None: as many as min_time needs
    repeats: int = 5
    channels_last: bool = False
    compile: bool = False
    img_size: tuple = (224, 224)
    min_time: Optional[float] = None  # seconds per timing (default 1.0 CPU, 0.2 CUDA)
    min_iters: Optional[int] = None  # at least this many iterations per timing (default 1 CPU, 10 CUDA)
    max_iters: int = 10000
    pair_every: Optional[int] = None  # baseline timed before/after every chunk of this many models
    bootstrap: int = 2000  # resamples of the per-pair ratios (seeded)
    seed: int = 0
    noisy_pct: float = 5.0  # flag a row whose interval leaves +-noisy_pct % of its median
    # after the scheduled rounds, up to this many more paired rounds (row, then baseline) for the rows
    # still flagged noisy, one round at a time, until their interval is inside +-noisy_pct (0: none)
    extra_repeats: int = 0
    # then up to this many more paired rounds for the rows that still have fewer clean pairs than ``repeats``
    # (contended or unsteady pairs left out): a row whose host kept changing speed gets more pairs, not a
    # median of the few steady ones left (0: none)
    refill_repeats: int = 0
    contention_pct: float = 10.0  # a timing whose host load (other processes + steal) exceeds this % is contended
    # a pair whose two bracketing baseline timings differ by more than this % of their mean is unsteady: the
    # host's speed changed during the pair (a regime /proc/stat cannot see), so its ratio is left out like a
    # contended one (0: off)
    bracket_pct: float = 10.0
    min_clean_pairs: int = 3  # keep every pair of a row unless at least this many clean ones remain
    check_kernels: bool = True  # record the attention kernel (profiler on the last warm-up iteration)
    allocator: str = "steady"  # CPU: "steady" pins glibc malloc's thresholds (no page-fault churn); "system"

    def __post_init__(self):
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"unknown allocator {self.allocator!r}; use one of {', '.join(ALLOCATORS)}")

    def resolved(self) -> "SpeedConfig":
        cpu = torch.device(self.device).type == "cpu"
        c = SpeedConfig(**asdict(self))
        if c.warmup is None:
            c.warmup = 2 if cpu else 10
        if c.min_time is None:
            c.min_time = 1.0 if cpu else 0.2
        if c.min_iters is None:
            c.min_iters = 1 if cpu else 10
        c.img_size = tuple(c.img_size)
        return c

    def describe(self, paired: bool = True) -> str:
        """One line: the protocol as run (``paired``: with a baseline and speed-ups)."""
        timed = (f"{self.iters} timed iterations per timing" if self.iters else
                 f"iterations calibrated to >= {self.min_time:g} s per timing (>= {self.min_iters})")
        pairs = "each model bracketed by baseline timings" if not self.pair_every else \
            f"baseline timed around every {self.pair_every} models"
        head = f"synthetic input, eval+inference_mode, {self.warmup} warm-up, {timed}, {self.repeats} interleaved repeats"
        if paired and self.extra_repeats:
            head += (f" (then up to {self.extra_repeats} more paired rounds for each row whose interval still "
                     f"leaves +-{self.noisy_pct:g}%)")
        if paired and self.refill_repeats:
            head += (f" (then up to {self.refill_repeats} more paired rounds for each row left with fewer than "
                     f"{self.repeats} clean pairs)")
        if paired and host_busy_s() is not None:
            head += (f", pairs with a timing contended beyond {self.contention_pct:g}% host load (other processes, "
                     f"steal) left out")
        if paired and self.bracket_pct:
            head += f", pairs whose two baseline timings differ by more than {self.bracket_pct:g}% (unsteady) left out"
        if self.allocator == "steady" and torch.device(self.device).type == "cpu":
            head += ", malloc thresholds pinned" + (", large tensors on huge pages" if huge_pages_active() else "")
        if not paired:
            return head + f" (direction alternating), device sync, median with a {self.bootstrap}-resample bootstrap 95% interval"
        return (f"{head} ({pairs}, direction alternating), device sync, median; speed-up = median of per-pair "
                f"ratios with a {self.bootstrap}-resample bootstrap 95% interval (seed {self.seed}); "
                f"noisy = interval beyond +-{self.noisy_pct:g}%")


ALLOCATORS = ("steady", "system")
# glibc mallopt parameters (malloc.h) and the largest mmap threshold glibc accepts on 64-bit
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1 << 30


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` does not exist)."""
    try:
        import resource  # Unix only
    except ImportError:  # pragma: no cover - Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


_PROC_STAT = "/proc/stat"
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal (guest time is inside user)


def _busy(fields: list[str]) -> int:
    vals = [int(v) for v in fields[1:]]
    return sum(vals[i] for i in _BUSY_FIELDS if i < len(vals))


def host_busy_s(cpus: Optional[set] = None) -> Optional[float]:
    """CPU seconds the host's CPUs have spent busy so far, steal included (``/proc/stat``; idle and
    iowait are not busy): the CPUs numbered in ``cpus`` (their ``cpuN`` lines), or every CPU (the
    aggregate first line) when ``cpus`` is None.  None where it cannot be read (not Linux)."""
    try:
        with open(_PROC_STAT) as fh:
            lines = [ln.split() for ln in fh if ln.startswith("cpu")]
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    if not lines or lines[0][0] != "cpu":
        return None
    if cpus is None:
        return _busy(lines[0]) / ticks
    mine = [ln for ln in lines[1:] if ln[0][3:].isdigit() and int(ln[0][3:]) in cpus]
    return sum(_busy(ln) for ln in mine) / ticks if mine else None


def host_cpus() -> set:
    """The CPUs this process may run on (its affinity; every CPU where that cannot be read)."""
    try:
        if hasattr(os, "sched_getaffinity"):
            return set(os.sched_getaffinity(0))
    except OSError:  # pragma: no cover
        pass
    return set(range(os.cpu_count() or 1))


class HostLoad:
    """What the host did besides this process while a timing ran: ``start()`` before, ``share(wall)``
    after, giving the share of the CPU time of this process's CPUs (its affinity set, over ``wall``
    seconds) that went to other processes or was stolen by the hypervisor, in [0, 1]; None where
    ``/proc/stat`` cannot be read.  Only this process's CPUs count: on a large shared node, other jobs
    pinned to other cores do not slow it down and are not its host load (where the per-CPU lines cannot
    be matched, every CPU counts).  Its resolution is one clock tick (10 ms) per CPU, about 2-3% of a
    0.4 s timing on 2 CPUs."""

    def __init__(self):
        cpus = host_cpus()
        self.cpus = cpus if host_busy_s(cpus) is not None else None
        self.n = len(cpus) if self.cpus is not None else (os.cpu_count() or 1)
        self._h = self._c = None

    def start(self) -> None:
        self._h, self._c = host_busy_s(self.cpus), time.process_time()

    def share(self, wall: float) -> Optional[float]:
        h = host_busy_s(self.cpus)
        if h is None or self._h is None or wall <= 0:
            return None
        foreign = (h - self._h) - (time.process_time() - self._c)
        return min(1.0, max(0.0, foreign / (wall * self.n)))


_THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_kernel_mode() -> Optional[str]:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None where there is none."""
    try:
        with open(_THP_SYSFS) as fh:
            mode = re.search(r"\[(\w+)\]", fh.read())
    except OSError:
        return None
    return mode.group(1) if mode else None


def _huge_kib_at(addr: int) -> int:
    """KiB on transparent huge pages in the mapping that holds ``addr`` (``/proc/self/smaps``)."""
    inside = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split(None, 1)[0] if line.strip() else ""
            if "-" in head and not head.endswith(":"):  # a mapping's first line: start-end perms ...
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


@functools.lru_cache(maxsize=None)
def _huge_pages_state() -> tuple[bool, str]:
    """(in effect, description) for :func:`huge_pages`, probed once per process."""
    setting = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    kernel = thp_kernel_mode()
    if kernel is None:
        return False, "no transparent huge pages (not available on this system)"
    if kernel == "never":
        return False, "no transparent huge pages (the kernel's THP setting is never)"
    probe = torch.ones(8 << 20, dtype=torch.uint8)
    try:
        huge_kib = _huge_kib_at(probe.data_ptr())
    except OSError:
        return False, "no transparent huge pages (their use cannot be read on this system)"
    del probe
    if huge_kib >= 2048:
        return True, f"large tensors on transparent huge pages (THP_MEM_ALLOC_ENABLE={setting}, kernel THP {kernel})"
    if setting == "0":
        return False, f"no transparent huge pages (THP_MEM_ALLOC_ENABLE=0, kernel THP {kernel})"
    return False, (f"no transparent huge pages (kernel THP {kernel}: torch allocated before THP_MEM_ALLOC_ENABLE "
                   "was set, i.e. before bench was imported, or the kernel had no huge page free)")


def huge_pages() -> str:
    """Whether this process's large CPU tensors sit on transparent huge pages, as one phrase.

    Checked, not assumed: an 8 MiB tensor is allocated and written, and the mapping that holds it must
    have at least one 2 MiB page (``AnonHugePages``).  torch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first
    allocation, so a process that allocated before importing ``bench`` runs without (and says so)."""
    return _huge_pages_state()[1]


def huge_pages_active() -> bool:
    return _huge_pages_state()[0]


def steady_allocator() -> str:
    """Keep freed memory in the process so repeated forwards reuse warm pages (glibc only).

    glibc serves blocks above its mmap threshold with fresh mappings and unmaps them on free; the
    threshold adapts to the history of frees, so how many page faults a forward pays depends on
    what ran before it.  Fixing the threshold at glibc's maximum (32 MiB on 64-bit) and the trim
    threshold at 1 GiB removes that dependence.  Returns a description of what was done, or why
    nothing was (another C library, e.g. musl or macOS).  Idempotent, process-wide."""
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
        version.restype = ctypes.c_char_p
        glibc = version().decode()
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError):
        return "system (not glibc: left as is)"
    if not ok:
        return f"system (glibc {glibc} refused mallopt); {huge_pages()}"
    return f"steady (glibc {glibc}: mmap threshold 32 MiB, trim threshold 1 GiB); {huge_pages()}"


def autocast_ctx(precision: str, device: str):
    dev = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext(), "float32"
    if precision == "amp":
        dtype = torch.float16 if dev == "cuda" else torch.bfloat16
        return torch.autocast(dev, dtype=dtype), f"autocast {str(dtype).replace('torch.', '')}"
    if precision == "bf16":
        return torch.autocast(dev, dtype=torch.bfloat16), "autocast bfloat16"
    raise ValueError(f"unknown precision {precision!r}; use fp32, amp or bf16")


def precision_supported(precision: str, device: str) -> Optional[str]:
    """None when ``precision`` runs on ``device``, else the reason it does not."""
    d = torch.device(device)
    if precision == "bf16" and d.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"bfloat16 not supported on {env.device_name(device)}"
    return None


def sync(device) -> None:
    """Wait for the device's queued work (a no-op where execution is synchronous, e.g. CPU)."""
    d = torch.device(device)
    if d.type == "cuda":
        torch.cuda.synchronize(d)
    elif d.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def prepare(model, cfg: SpeedConfig, compile: Optional[bool] = None, channels_last: Optional[bool] = None) -> Callable:
    """The callable that is timed: ``model`` in eval mode on the device, optionally channels-last and
    ``torch.compile``d (defaults from ``cfg``)."""
    compile = cfg.compile if compile is None else compile
    channels_last = cfg.channels_last if channels_last is None else channels_last
    model.eval().to(cfg.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    return model


def timed_loop(fn: Callable[[], object], iters: int, device) -> float:
    """Seconds per call of ``fn`` over ``iters`` back-to-back calls, device synchronised before the
    clock starts and before it stops.  The one timing loop of the suite (classification and
    segmentation throughput)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def _time(fn, x, iters: int, device: str) -> float:
    return timed_loop(lambda: fn(x), iters, device)


def calibrate_iters(t_one: float, cfg: SpeedConfig) -> int:
    """Iterations per timing: ``cfg.iters`` if fixed, else enough for ``min_time`` seconds."""
    if cfg.iters:
        return int(cfg.iters)
    n = math.ceil(cfg.min_time / max(t_one, 1e-9))
    return int(min(max(n, cfg.min_iters, 1), cfg.max_iters))


# --------------------------------------------------------------------------- statistics
def bootstrap_median_ci(values, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values`` (seeded, so reports repeat)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    if a.size == 1 or resamples <= 0:
        return float(a.min()), float(a.max())
    rng = np.random.default_rng(seed)
    meds = np.median(a[rng.integers(0, a.size, size=(resamples, a.size))], axis=1)
    lo, hi = np.quantile(meds, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _iqr(v: list[float]) -> float:
    if len(v) < 2:
        return 0.0
    q = statistics.quantiles(sorted(v), n=4)
    return q[2] - q[0]


def is_noisy(median: float, lo: float, hi: float, pct: float) -> bool:
    return bool(lo < median * (1 - pct / 100) or hi > median * (1 + pct / 100))


def _summary(times: list[float], batch: int, cfg: Optional[SpeedConfig] = None) -> dict:
    ips = sorted(batch / t for t in times)
    out = {
        "img_s": statistics.median(ips),
        "img_s_min": ips[0],
        "img_s_max": ips[-1],
        "img_s_iqr": _iqr(ips),
        "step_ms": statistics.median(times) * 1e3,
        "times_s": list(times),
    }
    if cfg is not None:
        lo, hi = bootstrap_median_ci(ips, cfg.bootstrap, cfg.seed)
        out.update(img_s_ci_low=lo, img_s_ci_high=hi, noisy=is_noisy(out["img_s"], lo, hi, cfg.noisy_pct))
    return out


def speedup_stats(ratios: list[float], cfg: SpeedConfig) -> dict:
    """Median of the per-pair ratios, spread, bootstrap interval and the noisy flag."""
    r = sorted(ratios)
    med = statistics.median(r)
    lo, hi = bootstrap_median_ci(r, cfg.bootstrap, cfg.seed)
    return {"speedup": med, "speedup_min": r[0], "speedup_max": r[-1], "speedup_iqr": _iqr(r),
            "speedup_ci_low": lo, "speedup_ci_high": hi, "noisy": is_noisy(med, lo, hi, cfg.noisy_pct),
            "pairs": len(r), "ratios": list(ratios)}


# --------------------------------------------------------------------------- attention kernel check
_KERNELS = [  # aten op name fragment -> label (first match wins)
    ("_scaled_dot_product_flash_attention_for_cpu", "flash (cpu)"),
    ("_scaled_dot_product_fused_attention_overrideable", "fused (backend)"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "mem-efficient"),
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_efficient_attention_forward", "mem-efficient"),
    ("_flash_attention_forward", "flash"),
    ("_scaled_dot_product_attention_math", "math (unfused)"),
]


def kernels_from_names(names) -> dict:
    """Attention kernels seen among profiler event names: ``attn_kernel`` (labels joined by '+',
    'none seen' when no scaled-dot-product op ran, e.g. an explicit softmax) and ``fused_sdpa``
    (a fused kernel served every SDPA call: no math fallback)."""
    seen = []
    for n in names:
        for frag, label in _KERNELS:
            if frag in n:
                if label not in seen:
                    seen.append(label)
                break
    fused = bool(seen) and "math (unfused)" not in seen
    return {"attn_kernel": "+".join(seen) if seen else "none seen", "fused_sdpa": fused}


def _sdpa_choice(args, kwargs) -> str:
    """The aten op name of the kernel ``scaled_dot_product_attention`` selects for these inputs."""
    try:  # the dispatcher passes the schema's positional arguments positionally, scale/enable_gqa by name
        choice = int(torch._fused_sdp_choice(*args, **kwargs))
    except Exception:  # noqa: BLE001 - private API: say so rather than guess
        return "sdpa backend unknown"
    cpu = args[0].device.type == "cpu"
    return {0: "_scaled_dot_product_attention_math",
            1: "_scaled_dot_product_flash_attention_for_cpu" if cpu else "_scaled_dot_product_flash_attention",
            2: "_scaled_dot_product_efficient_attention", 3: "_scaled_dot_product_cudnn_attention",
            4: "_scaled_dot_product_fused_attention_overrideable"}.get(choice, "sdpa backend unknown")


class _Ops(TorchDispatchMode):
    """Records the names of the aten ops a call reaches (and SDPA's kernel choice) in ``names``."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.names.add(func.name())
        if func is torch.ops.aten.scaled_dot_product_attention.default:
            # inference_mode hands the composite op to the mode: ask SDPA which kernel it picks
            self.names.add(_sdpa_choice(args, kwargs))
        return func(*args, **kwargs)


def _profiled_call(fn, device, compiled: bool = False) -> dict:
    """Call ``fn`` once and say which attention kernel ran.  Eager models: a dispatch mode records
    the aten ops the call reaches (SDPA has picked its kernel by then); compiled models: the profiler
    (a dispatch mode would send dynamo back to eager)."""
    if not compiled:
        with _Ops() as mode:
            fn()
        sync(device)
        return kernels_from_names(mode.names)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
        sync(device)
    return kernels_from_names({e.key for e in p.key_averages()})


# --------------------------------------------------------------------------- the measurement
def schedule(names: list[str], baseline: Optional[str], repeats: int, pair_every: Optional[int] = None) -> list:
    """The timing order: a list of ``(repeat, name)``.  Without a baseline every round times each
    model once, direction alternating.  With one, the baseline brackets every chunk of
    ``pair_every`` models (default: all of them); adjacent rounds share a baseline timing."""
    others = [n for n in names if n != baseline]
    seq = []
    if baseline is None:
        for rep in range(repeats):
            seq += [(rep, n) for n in (others if rep % 2 == 0 else others[::-1])]
        return seq
    g = pair_every or max(1, len(others))
    seq.append((0, baseline))
    for rep in range(repeats):
        order = others if rep % 2 == 0 else others[::-1]
        for j in range(0, len(order), g):
            seq += [(rep, n) for n in order[j:j + g]]
            seq.append((rep, baseline))
    return seq


def measure(models: dict, cfg: SpeedConfig, baseline: Optional[str] = None, progress=None,
            variants: Optional[dict] = None) -> dict:
    """Time several models interleaved; returns per-model stats and speed-ups vs ``baseline``.

    ``variants`` maps a model name to prepare options (``{"compile": True}``, ``{"channels_last": True}``)
    that override ``cfg`` for that model only (e.g. the unreduced model compiled, next to eager rows).
    A model that fails to prepare or run (compile error, out of memory) is left out and reported
    under ``failed`` with the reason; the others are measured.
    """
    cfg = cfg.resolved()
    variants = variants or {}
    dev = cfg.device
    if torch.device(dev).type == "cuda":
        torch.backends.cudnn.benchmark = True
    allocator = "system"
    if torch.device(dev).type == "cpu" and cfg.allocator == "steady":
        allocator = steady_allocator()
    ctx_factory = lambda: autocast_ctx(cfg.precision, dev)[0]  # noqa: E731
    _, prec_desc = autocast_ctx(cfg.precision, dev)
    x = torch.randn(cfg.batch_size, 3, *cfg.img_size, device=dev)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    failed: dict[str, str] = {}
    fns, inputs, opts, first_call, kernels, iters = {}, {}, {}, {}, {}, {}
    for k, m in models.items():
        o = {"compile": cfg.compile, "channels_last": cfg.channels_last, **variants.get(k, {})}
        opts[k] = o
        try:
            fns[k] = prepare(m, cfg, compile=o["compile"], channels_last=o["channels_last"])
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            failed[k] = f"prepare: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        inputs[k] = x_cl if o["channels_last"] else x
    if baseline is not None and baseline not in fns:
        raise RuntimeError(f"the baseline {baseline!r} could not be prepared: {failed.get(baseline)}")

    with torch.inference_mode(), ctx_factory():
        for k in list(fns):  # warm-up + kernel check + calibration, each model before any timing
            try:
                iters[k] = _warm_up(k, fns[k], inputs[k], cfg, bool(opts[k]["compile"]), first_call, kernels)
            except Exception as e:  # noqa: BLE001
                if k == baseline:
                    raise
                failed[k] = f"run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                del fns[k]
                if torch.device(dev).type == "cuda":
                    torch.cuda.empty_cache()
        names = list(fns)
        seq = schedule(names, baseline, cfg.repeats, cfg.pair_every)
        timings = []  # (repeat, name, seconds per iteration), in time order
        loads = []  # host load of each timing (share of this process's CPUs' time taken by others), same order
        faults = {k: 0 for k in names}  # minor page faults during the model's timings (allocator churn)
        host = HostLoad()

        def time_one(rep: int, k: str) -> None:
            f, xi = fns[k], inputs[k]
            f0 = minor_faults()
            host.start()
            w0 = time.perf_counter()
            timings.append((rep, k, timed_loop(lambda: f(xi), iters[k], dev)))
            loads.append(host.share(time.perf_counter() - w0))
            faults[k] += minor_faults() - f0

        for j, (rep, k) in enumerate(seq):
            time_one(rep, k)
            if progress and (j + 1 == len(seq) or seq[j + 1][0] != rep):
                progress(rep + 1, cfg.repeats)
        if baseline is not None:
            extra, refill = max(0, cfg.extra_repeats), max(0, cfg.refill_repeats)
            for j in range(extra + refill):
                # the extra rounds serve noisy rows and rows short of clean pairs; the refill rounds after
                # them only the rows still short of clean pairs (none short and none noisy: nothing to do)
                again = noisy_rows(timings, baseline, names, cfg, loads, noisy=j < extra)
                if not again:
                    break
                rep = cfg.repeats + j
                # the sequence so far ends with a baseline timing, so row, baseline, row, baseline...
                # brackets every extra row timing as in the scheduled rounds
                for k in (again if rep % 2 == 0 else again[::-1]):
                    time_one(rep, k)
                    time_one(rep, baseline)

    times = {k: [t for _, n, t in timings if n == k] for k in names}
    contended = contended_timings(loads, cfg)
    out = {
        "config": {**asdict(cfg), "precision_desc": prec_desc, "protocol": cfg.describe(baseline is not None),
                   "allocator_desc": allocator},
        "stamp": env.stamp(dev),
        "models": {},
        "failed": failed,
        "host_load": host_load_summary(loads, contended, cfg),
        # every timing in time order, [model, seconds per call, host load]: enough to recompute the pairs
        # and speed-ups under other settings (row_speedup) without timing again
        "timings": [[k, t, load] for (_, k, t), load in zip(timings, loads)],
    }
    for k in names:
        mine = [i for i, (_, n, _) in enumerate(timings) if n == k]
        clean = [timings[i][2] for i in mine if i not in contended]
        # images/s from the uncontended timings too (all of them when too few are)
        s = _summary(clean if len(clean) >= min(cfg.min_clean_pairs, len(mine)) else times[k], cfg.batch_size, cfg)
        known = [loads[i] for i in mine if loads[i] is not None]
        s.update(iters=iters[k], first_call_s=first_call[k], compile=bool(opts[k]["compile"]),
                 page_faults_per_iter=faults[k] / (iters[k] * len(times[k])),
                 host_load_max=max(known) if known else None,
                 contended_timings=sum(i in contended for i in mine),
                 channels_last=bool(opts[k]["channels_last"]), **kernels.get(k, {}))
        out["models"][k] = s
    if baseline is not None:
        for k in names:
            if k == baseline:
                continue
            out["models"][k].update(row_speedup(timings, baseline, k, cfg, contended))
    return out


def contended_timings(loads: list, cfg: SpeedConfig) -> set[int]:
    """Indices of the timings whose host load exceeds ``cfg.contention_pct`` (unknown loads never do)."""
    return {i for i, v in enumerate(loads) if v is not None and v * 100 > cfg.contention_pct}


def host_load_summary(loads: list, contended: set, cfg: SpeedConfig) -> dict:
    known = [v for v in loads if v is not None]
    return {"measured": bool(known), "timings": len(loads), "contended": len(contended),
            "median_pct": round(100 * statistics.median(known), 2) if known else None,
            "max_pct": round(100 * max(known), 2) if known else None, "threshold_pct": cfg.contention_pct}


def host_load_line(h: dict) -> Optional[str]:
    """``measure``'s ``host_load`` as one line for a printout, None where it was not measured."""
    if not h.get("measured"):
        return None
    return (f"host load (other processes + steal): median {h['median_pct']:.1f}%, max {h['max_pct']:.1f}% per "
            f"timing; {h['contended']} of {h['timings']} timings contended")


def row_speedup(timings: list, baseline: str, name: str, cfg: SpeedConfig, contended: set) -> dict:
    """``speedup_stats`` of the row's clean pairs: neither contended (a timing above the host-load
    threshold) nor unsteady (its baseline timings apart by more than ``cfg.bracket_pct``).  When fewer than
    ``cfg.min_clean_pairs`` are clean, every pair is used and ``kept_unclean`` says so.  Also returns
    ``contended_pairs`` and ``unsteady_pairs`` (left out, or that would have been; a pair that is both
    counts as contended) and ``clean_pairs``."""
    pairs = _pairs(timings, baseline, name)
    hit = [bool(idx & contended) for _, idx, _ in pairs]
    shaky = [not h and unsteady(gap, cfg) for h, (_, _, gap) in zip(hit, pairs)]
    clean = [r for (r, _, _), h, u in zip(pairs, hit, shaky) if not (h or u)]
    kept = len(clean) < min(cfg.min_clean_pairs, len(pairs))
    out = speedup_stats([r for r, _, _ in pairs] if kept else clean, cfg)
    out.update(contended_pairs=sum(hit), unsteady_pairs=sum(shaky), kept_unclean=kept, clean_pairs=len(clean))
    return out


def unsteady(gap: float, cfg: SpeedConfig) -> bool:
    """A pair's two baseline timings ``gap`` apart (relative to their mean) exceed ``cfg.bracket_pct``."""
    return bool(cfg.bracket_pct) and gap * 100 > cfg.bracket_pct


def _warm_up(k: str, f, xi, cfg: SpeedConfig, compiled: bool, first_call: dict, kernels: dict) -> int:
    """Warm up model ``k`` (``f`` on ``xi``): ``first_call[k]`` is the first call's seconds (compilation
    included for a compiled model), ``kernels[k]`` what the last warm-up call ran (with
    ``cfg.check_kernels``); returns the calibrated iteration count."""
    dev = cfg.device
    for w in range(max(1, cfg.warmup)):
        last = w == max(1, cfg.warmup) - 1
        t0 = time.perf_counter()
        if last and cfg.check_kernels:  # the last warm-up call says which kernels ran
            kernels[k] = _profiled_call(lambda: f(xi), dev, compiled=compiled)
        else:
            f(xi)
            sync(dev)
        if w == 0:  # includes compilation for a compiled model
            first_call[k] = time.perf_counter() - t0
    return calibrate_iters(timed_loop(lambda: f(xi), 1, dev), cfg)


def noisy_rows(timings: list, baseline: str, names: list, cfg: SpeedConfig, loads: Optional[list] = None,
               noisy: bool = True) -> list[str]:
    """The models (not the baseline) that need more pairs, from the timings so far: the speed-up interval
    is flagged noisy (with ``noisy``), or contended and unsteady pairs left fewer clean pairs than the
    scheduled rounds give."""
    contended = contended_timings(loads or [], cfg)
    again = []
    for k in names:
        if k == baseline:
            continue
        r = row_speedup(timings, baseline, k, cfg, contended)
        if (noisy and r["noisy"]) or r["clean_pairs"] < cfg.repeats:
            again.append(k)
    return again


def _pairs(timings: list, baseline: str, name: str) -> list[tuple[float, set, float]]:
    """Per timing of ``name``: (ratio, the indices of the timings it used, bracket gap).  The ratio is the
    mean of the baseline timings right before and right after it, divided by it; the gap is how far those
    two baseline timings are apart, relative to their mean (0 with only one)."""
    out = []
    for i, (rep, k, t) in enumerate(timings):
        if k != name:
            continue
        before = next((j for j in range(i - 1, -1, -1) if timings[j][1] == baseline), None)
        after = next((j for j in range(i + 1, len(timings)) if timings[j][1] == baseline), None)
        ref = [j for j in (before, after) if j is not None]
        t_ref = [timings[j][2] for j in ref]
        mean = sum(t_ref) / len(t_ref)
        out.append((mean / t, {i, *ref}, abs(t_ref[0] - t_ref[-1]) / mean))
    return out
