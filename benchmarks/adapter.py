"""Benchmark of the Mod-Adapter network: parameter count, peak memory, forward latency.

Measures one forward for 1, 3 and 8 concepts (one reference image each, 257
image tokens: CLIP ViT-L/14 at 224 px) in two routing cases:

* ``spread``: concept c goes to expert c mod num_experts, so 8 concepts use 8
  different experts (the worst case: every expert's weights are read);
* ``shared``: every concept goes to expert 0 (the best case).

Weights are random (built on the meta device, then filled with N(0, 0.02)):
latency and memory do not depend on their values, and a 1.67B network
initialises in seconds this way.

Peak memory of a forward (weights excluded):
* CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the
  forward (after ``reset_peak_memory_stats``);
* CPU: the process's resident set size, read from ``/proc/self/statm`` by a
  sampling thread every 0.5 ms during the forward, peak minus the RSS before.
  This measures what the OS really gave the process, but can miss a very short
  peak (forwards of a few ms) and under-counts memory the allocator reuses
  from earlier frees; treat it as a lower bound.

Example:
    python benchmarks/adapter.py --preset tiny --device cpu --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import torch

from _measure import synchronize
from mod_adapter.modules.adapter import ModAdapter
from mod_adapter.modules.config import ModAdapterConfig

CONCEPT_COUNTS = (1, 3, 8)
IMAGE_TOKENS = 257
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_random_adapter(config: ModAdapterConfig, device: torch.device, dtype: torch.dtype) -> ModAdapter:
    with torch.device("meta"):
        adapter = ModAdapter(config)
    adapter = adapter.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for module in adapter.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.02, generator=generator)
                module.bias.zero_()
        adapter.router_centroids.normal_(0.0, 1.0, generator=generator)
    return adapter.to(dtype).eval()


class RssSampler:
    """Peak resident set size of this process during a `with` block (Linux)."""

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s = interval_s
        self.page_size = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page_size

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self):
        self.before = self._rss()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_bytes(self) -> int:
        return self.peak - self.before


def measure(adapter, count, routing, device, dtype, repeats, warmup):
    config = adapter.config
    generator = torch.Generator(device="cpu").manual_seed(count)
    neutral = torch.randn(count, config.modulation_dim, generator=generator).to(device)
    tokens = torch.randn(count, IMAGE_TOKENS, config.image_token_dim, generator=generator).to(device=device, dtype=dtype)
    key_mask = torch.ones(count, IMAGE_TOKENS, dtype=torch.bool, device=device)
    if routing == "spread":
        experts = torch.arange(count, device=device) % config.num_experts
    else:
        experts = torch.zeros(count, dtype=torch.long, device=device)
    with torch.inference_mode():
        for _ in range(warmup):
            adapter(neutral, tokens, key_mask, experts)
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            adapter(neutral, tokens, key_mask, experts)
            synchronize(device)
            peak_extra = torch.cuda.max_memory_allocated(device) - before
        else:
            with RssSampler() as sampler:
                adapter(neutral, tokens, key_mask, experts)
            peak_extra = sampler.extra_bytes
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            adapter(neutral, tokens, key_mask, experts)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times), peak_extra


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(["tiny", "paper"]), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per case (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--routing", choices=["spread", "shared", "both"], default="both")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = ModAdapterConfig.preset(args.preset)
    started = time.perf_counter()
    adapter = build_random_adapter(config, device, dtype)
    weight_bytes = sum(t.numel() * t.element_size() for t in adapter.state_dict().values())
    # The load average shows whether other processes competed for the CPU during the run.
    print(f"preset={args.preset} device={device} dtype={args.dtype} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"loadavg_before={os.getloadavg()[0]:.2f}")
    if device.type == "cuda":
        print(f"gpu={torch.cuda.get_device_name(device)}")
    print(f"parameters={adapter.num_parameters():,} weights={weight_bytes / 2**20:,.1f} MiB (built in {time.perf_counter() - started:.1f} s)")
    memory_kind = "CUDA max_memory_allocated" if device.type == "cuda" else "RSS sampled, lower bound"
    print(f"| routing | concepts | median forward (ms) | peak extra memory (MiB, {memory_kind}) |")
    print("|---|---:|---:|---:|")
    routings = ["spread", "shared"] if args.routing == "both" else [args.routing]
    rows = []
    ratios = {}
    for routing in routings:
        latencies = {}
        for count in CONCEPT_COUNTS:
            latency, peak = measure(adapter, count, routing, device, dtype, args.repeats, args.warmup)
            latencies[count] = latency
            rows.append({"routing": routing, "concepts": count, "median_forward_ms": latency * 1e3,
                         "peak_extra_memory_mib": peak / 2**20})
            print(f"| {routing} | {count} | {latency * 1e3:,.2f} | {peak / 2**20:,.1f} |", flush=True)
        ratios[routing] = latencies[8] / latencies[1]
        print(f"| {routing} | time(8)/time(1) | {ratios[routing]:.2f} | |", flush=True)
    print(f"loadavg_after={os.getloadavg()[0]:.2f}")
    if args.json:
        results = {"preset": args.preset, "device": str(device), "dtype": args.dtype, "torch": torch.__version__,
                   "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
                   "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                   "parameters": adapter.num_parameters(), "weights_mib": weight_bytes / 2**20,
                   "repeats": args.repeats, "warmup": args.warmup, "image_tokens": IMAGE_TOKENS,
                   "memory_method": memory_kind, "rows": rows, "time8_over_time1": ratios,
                   "load_average_after": os.getloadavg()[0]}
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
