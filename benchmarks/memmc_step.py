"""MemMC-MAE training step against the plain MAE of the same size: time per step and peak memory, in one run.

Both models have the same encoder (width, depth, heads), decoder, patch size, mask ratio and batch as the
``bundles/memmc_mae`` defaults (128 x 128 radiographs, 16-pixel patches, ViT 192 x 4, decoder 128 x 2, mask 0.75);
MemMC-MAE adds 16 memory slots per encoder block and cross-attention from every decoder block to all four encoder
levels (Tian et al., 2023, https://arxiv.org/abs/2203.11725). A step is forward + masked-MSE loss + backward + AdamW
step (fused, as the bundle runs it). Timing interleaves the two models round by round and reports each one's median
step.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over a few steps, above the memory held before them; on
CPU (whose tensors have no allocator statistics) the highest resident set size sampled during the first few steps of
a fresh process above its size just before them, which includes the optimiser state and allocator caching.

Run: ``python benchmarks/memmc_step.py [--device cuda] [--quick] [--steps N] [--rounds N] [--threads N]``. The last
line of output is one JSON object; ``step_time_ratio`` and ``peak_memory_ratio`` are MemMC-MAE over MAE (> 1: MemMC
is slower / needs more).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import threading
import time

import torch

from medssl.methods import MaskedAutoencoder, MemMCMAE

DEFAULT = {
    "image_size": (128, 128), "patch_size": (16, 16), "embed_dim": 192, "depth": 4, "num_heads": 3,
    "decoder_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4, "mask_ratio": 0.75,
}
QUICK = {
    "image_size": (32, 32), "patch_size": (8, 8), "embed_dim": 32, "depth": 2, "num_heads": 2,
    "decoder_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2, "mask_ratio": 0.75,
}
MEMORY_SLOTS = 16


def build(method: str, config: dict) -> torch.nn.Module:
    """The benchmark's ``"memmc_mae"`` or ``"mae"`` model of the given size (seeded)."""
    torch.manual_seed(0)
    if method == "memmc_mae":
        return MemMCMAE(**config, memory_slots=MEMORY_SLOTS)
    return MaskedAutoencoder(**config)


class Stepper:
    """One model, its AdamW optimiser, a fixed batch and a seeded mask generator."""

    def __init__(self, method: str, config: dict, batch: int, device: torch.device) -> None:
        self.model = build(method, config).to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        images = torch.rand(batch, 1, *config["image_size"], generator=torch.Generator().manual_seed(1))
        self.batch = {"image": images.to(device)}
        self.generator = torch.Generator(device=device).manual_seed(2)
        self.device = device

    def step(self) -> float:
        """One training step; returns its wall time in seconds (synchronised on CUDA)."""
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(self.batch, generator=self.generator)["loss"]
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _cpu_peak_rise(method: str, config: dict, batch: int, steps: int, queue) -> None:
    """Child process: the highest resident set size during ``steps`` steps minus the size just before them (MB),
    sampled every 0.5 ms by a thread."""
    torch.set_num_threads(1)
    stepper = Stepper(method, config, batch, torch.device("cpu"))
    baseline, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(steps):
        stepper.step()
    done.set()
    sampler.join()
    queue.put(max(0, peak[0] - baseline) / 2**20)


def peak_memory_mb(method: str, config: dict, batch: int, device: torch.device, steps: int = 3) -> float:
    """Peak memory of training steps in MB (see the module docstring for how, per device)."""
    if device.type == "cuda":
        stepper = Stepper(method, config, batch, device)
        stepper.step()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            stepper.step()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_cpu_peak_rise, args=(method, config, batch, steps, queue))
    process.start()
    rise = queue.get(timeout=600)
    process.join()
    return rise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps, for a smoke test")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 16; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a table and, last, the JSON figures; returns them."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = QUICK if args.quick else DEFAULT
    batch = args.batch or (2 if args.quick else 16)
    steps, rounds = args.steps or (2 if args.quick else 5), args.rounds or (2 if args.quick else 3)
    steppers = {method: Stepper(method, config, batch, device) for method in ("memmc_mae", "mae")}
    times: dict[str, list[float]] = {method: [] for method in steppers}
    for stepper in steppers.values():
        stepper.step()  # warm-up: first-call allocations and kernel selection
    for _ in range(rounds):
        for method, stepper in steppers.items():
            times[method] += [stepper.step() for _ in range(steps)]
    medians = {method: statistics.median(values) for method, values in times.items()}
    peaks = {method: peak_memory_mb(method, config, batch, device) for method in steppers}
    params = {method: sum(p.numel() for p in stepper.model.parameters()) for method, stepper in steppers.items()}
    results = {
        "device": device.type,
        "threads": torch.get_num_threads(),
        "image_size": list(config["image_size"]),
        "patch_size": list(config["patch_size"]),
        "batch": batch,
        "memory_slots": MEMORY_SLOTS,
        "memmc_step_s": medians["memmc_mae"],
        "mae_step_s": medians["mae"],
        "step_time_ratio": medians["memmc_mae"] / medians["mae"],
        "memmc_peak_mb": peaks["memmc_mae"],
        "mae_peak_mb": peaks["mae"],
        "peak_memory_ratio": peaks["memmc_mae"] / peaks["mae"] if peaks["mae"] > 0 else float("nan"),
        "memmc_params": params["memmc_mae"],
        "mae_params": params["mae"],
        "steps_timed": steps * rounds,
    }
    for method in steppers:
        print(f"{method:10s} step {medians[method] * 1e3:8.1f} ms  peak {peaks[method]:8.1f} MB  "
              f"params {params[method] / 1e6:.2f} M")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
