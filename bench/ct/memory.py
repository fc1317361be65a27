"""The planner's memory model against measured training peaks.

The second optimisation step (forward, Dice+CE loss, backward, SGD Nesterov; the first
creates the momentum) per configuration, each in a fresh process, counting from before the
network is built. On a GPU the peak is
``torch.cuda.max_memory_allocated`` (with AMP); on the CPU it is the same quantity
taken from PyTorch's memory profiler (the most bytes of tensors alive at once), and the
process's resident high-water mark is shown beside it (it adds the CPU convolution
library's scratch buffers and the allocator's slack, which a GPU run does not have).
Both are compared with :func:`medhpc.ct.planner.estimate_bytes` less its fixed CUDA
context allowance.

    python bench/ct/memory.py                 # the CPU table (about 1-2 min, 1 thread)
    python bench/ct/memory.py --device cuda   # on a GPU: the planned nnU-Net-size networks
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

THICK = (2.5, 0.8, 0.8)
#: name -> (widths or None = planned by the GPU rule, spacing z,y,x, patch, batch, checkpointing)
CPU_CASES = {
    "small 8..64": ((8, 16, 32, 64), (1.0, 1.0, 1.0), (64, 64, 64), 2, False),
    "small 8..64 + ckpt": ((8, 16, 32, 64), (1.0, 1.0, 1.0), (64, 64, 64), 2, True),
    "wide 32..256": ((32, 64, 128, 256), (1.0, 1.0, 1.0), (48, 48, 48), 2, False),
    "wide 32..256 + ckpt": ((32, 64, 128, 256), (1.0, 1.0, 1.0), (48, 48, 48), 2, True),
    "planned thick-slice 32..320": (None, THICK, (16, 96, 96), 2, False),
    "planned thick-slice 32..320 + ckpt": (None, THICK, (16, 96, 96), 2, True),
}
GPU_CASES = {
    "planned 8 GB (56x160x192)": (None, THICK, (56, 160, 192), 2, False),
    "planned 16 GB (80x224x224)": (None, THICK, (80, 224, 224), 2, False),
    "planned 16 GB + ckpt": (None, THICK, (80, 224, 224), 2, True),
    "isotropic 128^3 32..320": (None, (1.0, 1.0, 1.0), (128, 128, 128), 2, False),
}


def _resident_bytes() -> int:
    with open("/proc/self/statm") as stream:
        pages = int(stream.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def measure_one(case: dict) -> dict:
    """Run one step of ``case`` in this process and return estimate and measured bytes."""
    import resource

    import torch

    from medhpc.ct.planner import CONTEXT_BYTES, estimate_bytes, network_layout

    torch.set_num_threads(1)
    device = torch.device(case["device"])
    widths = None if case["widths"] is None else tuple(case["widths"])
    layout = network_layout(case["spacing"], case["patch"], widths)
    classes, batch, patch = 4, case["batch"], tuple(case["patch"])
    amp = device.type == "cuda"
    generator = torch.Generator().manual_seed(0)
    images = torch.randn((batch, 1) + patch, generator=generator)
    labels = torch.randint(0, classes, (batch,) + patch, generator=generator)
    images, labels = images.to(device), labels.to(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated()
        model, optimizer = _network(torch, layout, case, classes, device)
        _step(torch, model, optimizer, images, labels, device)  # creates the momentum
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        _step(torch, model, optimizer, images, labels, device)
        torch.cuda.synchronize()
        allocated = torch.cuda.max_memory_allocated() - before
        resident = None
    else:
        from torch.profiler import ProfilerActivity, profile

        before = _resident_bytes()
        model, optimizer = _network(torch, layout, case, classes, device)
        _step(torch, model, optimizer, images, labels, device)
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            _step(torch, model, optimizer, images, labels, device)
        kept = sum(p.numel() * p.element_size() for p in model.parameters())
        kept += sum(v.numel() * v.element_size() for state in optimizer.state.values()
                    for v in state.values() if torch.is_tensor(v))
        allocated = kept + _allocated_peak(profiler)
        resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    estimate = estimate_bytes(layout, classes, patch, batch, amp, case["checkpointing"]) \
        - CONTEXT_BYTES
    return {"estimate_gib": estimate / 2 ** 30, "allocated_gib": allocated / 2 ** 30,
            "resident_gib": None if resident is None else resident / 2 ** 30,
            "ratio": estimate / allocated, "step_s": time.perf_counter() - started,
            "layout": layout.to_dict()}


def _network(torch, layout, case, classes, device):
    from medhpc.ct.unet import UNet3D, UNetConfig

    model = UNet3D(UNetConfig.from_layout(layout, classes),
                   activation_checkpointing=case["checkpointing"]).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True)


def _step(torch, model, optimizer, images, labels, device) -> None:
    """One training step as ct-train runs it (gradients set to None between steps)."""
    from medhpc.ct.loss import dice_ce_loss

    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        loss = dice_ce_loss(model(images), labels)
    loss.backward()
    optimizer.step()


def _allocated_peak(profiler) -> int:
    """The most bytes of tensors alive at once, from the profiler's memory timeline."""
    from torch.profiler._memory_profiler import Action, MemoryProfile

    alive = peak = 0
    for _, action, _, size in MemoryProfile(profiler.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            alive += size
        elif action == Action.DESTROY:
            alive -= size
        peak = max(peak, alive)
    return peak


def run_case(name: str, spec, device: str) -> dict:
    widths, spacing, patch, batch, checkpointing = spec
    case = {"widths": widths, "spacing": spacing, "patch": patch, "batch": batch,
            "checkpointing": checkpointing, "device": device}
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: {done.stderr[-2000:]}")
    return {"name": name, **case, **json.loads(done.stdout.splitlines()[-1])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="JSON results (default bench/results/).")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.machine import machine  # noqa: E402

    cases = CPU_CASES if args.device == "cpu" else GPU_CASES
    rows = [run_case(name, spec, args.device) for name, spec in cases.items()]
    print(f"| network ({args.device}) | patch | batch | estimate GiB | allocated peak GiB "
          f"| estimate / allocated | resident peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        resident = "" if r["resident_gib"] is None else f"{r['resident_gib']:.2f}"
        print(f"| {r['name']} | {'x'.join(map(str, r['patch']))} | {r['batch']} "
              f"| {r['estimate_gib']:.3f} | {r['allocated_gib']:.3f} | {r['ratio']:.3f} "
              f"| {resident} |")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or Path(__file__).resolve().parents[1] / "results"
               / f"ct-memory-{args.device}-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"machine": machine(("medhpc", "torch", "numpy")), "rows": rows}
    out.write_text(json.dumps(document, indent=1))
    print(f"written {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
