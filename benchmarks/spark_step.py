"""SparK masked training step against the same dense CNN's supervised training step, 2D and 3D.

SparK: Tian et al., 2023, "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling", ICLR,
https://arxiv.org/abs/2301.03580 (medical study: Wolf et al., 2023, ResNet-50 on CT slices). medssl emulates sparse
convolution on dense tensors (every conv / pool output is re-masked, norms take visible-only statistics), so a
SparK step costs the full dense encoder plus the masking work plus the decoder; this benchmark measures how much.

Each configuration times, in the same run with interleaved rounds, one training step (forward + loss + backward +
fused AdamW step, as the bundle runs it) of:

- ``spark``: :class:`medssl.methods.spark.SparK` on the MONAI ResNet (mask ratio 0.6 on the stride-32 grid,
  densifying step and light UNet decoder, L2 to per-patch normalised pixels on hidden patches);
- ``dense``: the plain MONAI ResNet with its classification head, cross-entropy on random labels (what a
  supervised step on the same network costs);
- ``masked_dense``: the same SparK module with its sparse encoder swapped for the plain network: the hidden
  patches of the input are still zeroed and the densifying step and decoder are unchanged, but no layer re-masks
  its output or takes visible-only statistics. ``spark`` / ``masked_dense`` is the cost of the sparse machinery.

Figures per configuration: median wall-clock seconds per step over the timed rounds, samples/s, the ratios to
``dense`` (> 1: slower than the supervised step); the same for the process's CPU seconds per step (all threads),
whose ratios stay meaningful on a shared machine where other processes stretch wall-clock time; forward +
backward FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; the
optimiser's element-wise update is not counted); and the peak memory of one step above what is resident before it
(model, optimiser state, batch): ``torch.cuda.max_memory_allocated`` on a GPU; on CPU the growth of the process's
resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim`` hands freed
heap back, Linux only), ``memory_method`` says which.

Run: ``python benchmarks/spark_step.py [--device cuda] [--quick] [--repeats N] [--warmup N] [--threads N]
[--configs 2d 3d]``. The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from medssl.methods.spark import SparK

MASK_RATIO = 0.6  # SparK's, on the encoder's stride-32 grid (METHODS.md)
STEP_KINDS = ("spark", "dense", "masked_dense")


@dataclass(frozen=True)
class Config:
    """One benchmark configuration: a MONAI ``ResNet`` (stride-2 stem, as SparK's ResNets) and its input."""

    name: str
    block: str
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    image_size: tuple[int, ...]
    batch: int
    decoder_width: int
    num_classes: int = 2


# Sized for a 2-core CPU (a few minutes of CPU time in all): ResNet-18 on 224 x 224 slices with SparK's 768-wide
# decoder, and a 3D ResNet-18 on 64^3 volumes (a 2 x 2 x 2 mask grid) with the decoder narrowed to 192, as the 3D
# decoder's full-resolution blocks would otherwise dwarf the encoder.
FULL_CONFIGS = (
    Config("2d", "basic", (2, 2, 2, 2), (64, 128, 256, 512), (224, 224), batch=4, decoder_width=768),
    Config("3d", "basic", (2, 2, 2, 2), (64, 128, 256, 512), (64, 64, 64), batch=2, decoder_width=192),
)
QUICK_CONFIGS = (
    Config("2d", "basic", (1, 1, 1, 1), (8, 8, 16, 16), (64, 64), batch=2, decoder_width=32),
    Config("3d", "basic", (1, 1, 1, 1), (4, 4, 8, 8), (64, 64, 64), batch=2, decoder_width=32),
)


def build_network(config: Config) -> ResNet:
    """The plain MONAI ResNet of a configuration, one input channel, with its classification head."""
    return ResNet(
        config.block,
        list(config.layers),
        list(config.widths),
        spatial_dims=len(config.image_size),
        n_input_channels=1,
        conv1_t_stride=2,
        num_classes=config.num_classes,
    )


class Step:
    """One model, its loss on a fixed batch and its AdamW optimiser; ``run()`` is one training step."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> None:
        self.model, self.loss_fn = model.train(), loss_fn
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)

    def run(self, count_flops: bool = False) -> int:
        """One training step; returns the FLOPs of its forward + backward counted by ``FlopCounterMode`` when
        ``count_flops`` (the optimiser's element-wise update is not counted), else 0."""
        counter = FlopCounterMode(display=False) if count_flops else None
        with counter or contextlib.nullcontext():
            self.loss_fn(self.model).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return int(counter.get_total_flops()) if counter else 0


def build_steps(config: Config, device: torch.device) -> dict[str, Step]:
    """The three steps of a configuration, from one initialisation of the network, on one random batch.

    Args:
        config: the configuration.
        device: where the models and the batch live.

    Returns:
        ``{"spark", "dense", "masked_dense": Step}`` (see the module docstring).
    """
    torch.manual_seed(0)
    network = build_network(config)
    images = torch.rand(config.batch, 1, *config.image_size, device=device)
    labels = torch.randint(config.num_classes, (config.batch,), device=device)
    batch = {"image": images}

    def spark() -> SparK:
        return SparK(network, config.image_size, mask_ratio=MASK_RATIO, decoder_width=config.decoder_width).to(device)

    masked_dense = spark()
    # A plain copy in place of the sparsified one: SparseEncoder still zeroes the input's hidden patches, but no layer
    # of the network re-masks or normalises over visible positions only (same parameter names, same shapes).
    masked_dense.encoder.network = copy.deepcopy(network).to(device)
    dense = copy.deepcopy(network).to(device)
    return {
        "spark": Step(spark(), lambda model: model(batch)["loss"]),
        "dense": Step(dense, lambda model: F.cross_entropy(model(images), labels)),
        "masked_dense": Step(masked_dense, lambda model: model(batch)["loss"]),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(
    steps: dict[str, Step], repeats: int, warmup: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds of each step in ``repeats`` interleaved rounds (one step of each kind per
    round) after ``warmup`` untimed steps of each, so every kind sees the same machine state over the run.

    Args:
        steps: the steps by kind.
        repeats: timed rounds.
        warmup: untimed steps of each kind first.
        device: where the steps run (CUDA is synchronised around each timed step).

    Returns:
        ``{kind: [wall seconds of each round]}`` and ``{kind: [CPU seconds of each round]}`` (all threads of the
        process; time spent waiting for a busy CPU counts in the first only).
    """
    for step in steps.values():
        for _ in range(warmup):
            step.run()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            step.run()
            synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def _proc_status_kib(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def memory_method(device: torch.device) -> str | None:
    """How :func:`run_with_peak_memory` measures on ``device``, or None when it cannot (CPU outside Linux)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above memory_allocated before the step"
    if Path("/proc/self/clear_refs").exists():
        return "CPU resident-set high-water mark (VmHWM) above VmRSS before the step, after malloc_trim and a reset"
    return None


def run_with_peak_memory(run: Callable[[], int], device: torch.device) -> tuple[int, float | None]:
    """Call ``run`` and measure its peak memory above what is resident before it.

    Args:
        run: the work to measure.
        device: where it runs.

    Returns:
        ``run()``'s result and the peak in MB (10^6 bytes), None when :func:`memory_method` has no way on
        ``device``.
    """
    method = memory_method(device)
    if method is None:
        return run(), None
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = run()
        synchronize(device)
        return result, (torch.cuda.max_memory_allocated(device) - before) / 1e6
    # Freed heap kept by glibc would be reused without raising the high-water mark; hand it back first.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current resident set
    before = _proc_status_kib("VmRSS")
    result = run()
    return result, (_proc_status_kib("VmHWM") - before) * 1024 / 1e6


def benchmark_config(config: Config, device: torch.device, repeats: int, warmup: int) -> dict[str, object]:
    """All figures of one configuration (see the module docstring)."""
    steps = build_steps(config, device)
    samples, cpu_samples = step_times(steps, repeats, warmup, device)
    spread = {name: f"{min(v):.3g}..{max(v):.3g}" for name, v in samples.items()}
    print(f"{config.name}: seconds per step, fastest..slowest round: {spread}", file=sys.stderr, flush=True)
    times = {name: statistics.median(values) for name, values in samples.items()}
    cpu_times = {name: statistics.median(values) for name, values in cpu_samples.items()}
    # One more (untimed) step of each kind both counts FLOPs and measures memory; the counter holds no tensors.
    profiled = {
        name: run_with_peak_memory(partial(step.run, count_flops=True), device) for name, step in steps.items()
    }
    flops = {name: counted for name, (counted, _) in profiled.items()}
    memory = {name: peak for name, (_, peak) in profiled.items()}
    spark = steps["spark"].model
    grid = spark.encoder.mask_grid(config.image_size)
    figures: dict[str, object] = {
        "config": asdict(config),
        "mask_grid": list(grid),
        "visible_fraction": spark.masking.num_keep(grid) / torch.Size(grid).numel(),
    }
    for name in STEP_KINDS:
        figures[f"step_s_{name}"] = times[name]
        figures[f"step_cpu_s_{name}"] = cpu_times[name]
        figures[f"samples_per_s_{name}"] = config.batch / times[name]
        figures[f"gflop_{name}"] = flops[name] / 1e9
        figures[f"peak_memory_mb_{name}"] = memory[name]
    for name, reference in (("spark", "dense"), ("masked_dense", "dense"), ("spark", "masked_dense")):
        figures[f"time_ratio_{name}_vs_{reference}"] = times[name] / times[reference]
        figures[f"cpu_time_ratio_{name}_vs_{reference}"] = cpu_times[name] / cpu_times[reference]
        figures[f"flop_ratio_{name}_vs_{reference}"] = flops[name] / flops[reference]
        if memory[name] is not None and memory[reference]:
            figures[f"memory_ratio_{name}_vs_{reference}"] = memory[name] / memory[reference]
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny networks and few repeats, for a smoke test")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds, one step of each kind per round (default 3, quick 2)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each kind before timing")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--configs", nargs="+", choices=[c.name for c in FULL_CONFIGS], default=None,
                        help="run only these configurations (default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine.")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}.")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    names = args.configs or [config.name for config in FULL_CONFIGS]
    configs = [config for config in (QUICK_CONFIGS if args.quick else FULL_CONFIGS) if config.name in names]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results: dict[str, object] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "mask_ratio": MASK_RATIO,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "memory_method": memory_method(device),
    }
    for config in configs:
        results[config.name] = benchmark_config(config, device, args.repeats, args.warmup)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
