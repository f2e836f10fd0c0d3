"""Benchmarks behind ``python -m companion bench ...``: they print figures, they assert nothing."""

from __future__ import annotations

import os
import platform

import torch


def _device_name(dev: torch.device) -> str:
    """The GPU's name, or on Linux the processor's model name from /proc/cpuinfo."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return name


def check_device(device: str) -> torch.device:
    """``torch.device(device)``, or a clear RuntimeError for a device this machine does not have."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise RuntimeError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:0 or mps") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"--device {device} asks for a CUDA GPU, but PyTorch sees none here (torch.cuda.is_available() is "
            "False); run on a machine with an NVIDIA GPU and a CUDA build of PyTorch, or use --device cpu"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"--device {device} asks for Apple's MPS, which is not available here; use --device cpu")
    return dev


def _device(device: str | None, default: torch.device) -> torch.device:
    """The device to measure on: ``device`` if given (checked), else ``default``."""
    return check_device(device) if device else default


def bench_conv(device: str | None = None, num_threads: int | None = None) -> None:
    """Print the speed of conv2d_naive, conv2d (im2col) and F.conv2d on a few sizes."""
    import torch.nn.functional as F
    from torch.utils.benchmark import Timer

    from companion.conv import conv2d, conv2d_naive
    from companion.runtime import device as best_device

    dev = _device(device, best_device())
    threads = num_threads or torch.get_num_threads()
    print(f"device: {dev} ({_device_name(dev)}), torch {torch.__version__}, {threads} CPU threads")
    print("3x3 convolution, padding 1, float32; median time per call (torch.utils.benchmark, warm-up included)")
    sizes = [(1, 3, 8, 16), (8, 16, 32, 32), (32, 64, 64, 32), (32, 128, 128, 56)]  # (B, C_in, C_out, H=W)
    functions = {"conv2d_naive": conv2d_naive, "conv2d (im2col)": conv2d, "F.conv2d": F.conv2d}
    print(f"{'B x C_in x H x W -> C_out':>28} {'GFLOP':>7} {'im2col MiB':>10}" + "".join(f"{k:>17}" for k in functions))
    for B, C_in, C_out, S in sizes:
        x = torch.randn(B, C_in, S, S, device=dev)
        w = torch.randn(C_out, C_in, 3, 3, device=dev)
        gflop = 2 * B * C_out * S * S * C_in * 9 / 1e9  # one multiply and one add per weight per output
        cols_mib = B * C_in * 9 * S * S * 4 / 2**20  # the unfolded matrix: 9 times the input
        cells = []
        for label, fn in functions.items():
            if label == "conv2d_naive" and B * C_out * S * S > 10_000:  # one Python iteration per output
                cells.append(f"{'skipped':>17}")
                continue
            timer = Timer("fn(x, w, padding=1)", globals={"fn": fn, "x": x, "w": w}, num_threads=threads)
            with torch.inference_mode():
                seconds = timer.blocked_autorange(min_run_time=0.5).median  # synchronises CUDA itself
            cells.append(f"{seconds * 1e3:>14.3f} ms")
        shape = f"{B}x{C_in}x{S}x{S} -> {C_out}"
        print(f"{shape:>28} {gflop:>7.3f} {cols_mib:>10.1f}" + "".join(cells))


def bench_attention(
    device: str | None = None,
    lengths: tuple[int, ...] | None = None,
    batch_size: int = 1,
    num_heads: int = 4,
    head_dim: int = 64,
    min_time: float = 0.3,
    num_threads: int | None = None,
) -> list[dict[str, float]]:
    """Print (and return) time and peak memory of the readable and the fused attention path per sequence length."""
    import contextlib
    import functools

    from torch.autograd.profiler import profile
    from torch.utils.benchmark import Timer

    from companion.attention import scaled_dot_product_attention
    from companion.runtime import device as best_device
    from companion.runtime import quick

    dev = _device(device, best_device())
    threads = num_threads or torch.get_num_threads()  # CPU threads used while timing
    if lengths is None:
        lengths = (64, 128, 256, 512, 1024) if quick() else (64, 128, 256, 512, 1024, 2048, 4096)

    @contextlib.contextmanager
    def silent_stderr():  # the CPU profiler's C++ side logs its start and stop on file descriptor 2
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)

    def peak_mib(fn) -> float:
        """Peak memory allocated while fn runs, beyond what was allocated before, in MiB."""
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            before = torch.cuda.memory_allocated(dev)
            fn()
            torch.cuda.synchronize(dev)
            return (torch.cuda.max_memory_allocated(dev) - before) / 2**20
        if dev.type != "cpu":
            return float("nan")  # no allocator statistics on this device
        with silent_stderr(), profile(profile_memory=True, use_kineto=False) as prof:
            fn()
        current = peak = 0  # replay every allocation (+) and free (-) in time order
        for event in sorted(prof.function_events, key=lambda e: e.time_range.start):
            current += event.self_cpu_memory_usage
            peak = max(peak, current)
        return peak / 2**20

    print(f"device: {dev} ({_device_name(dev)}), torch {torch.__version__}, timed with {threads} CPU thread(s)")
    print(
        f"self-attention over N tokens, batch {batch_size} x {num_heads} heads, head dim {head_dim}, float32; "
        "median time per call (torch.utils.benchmark, synchronised), peak memory of one call"
    )
    header = ("N", "readable ms", "fused ms", "speed-up", "readable MiB", "fused MiB", "weights MiB")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (6, 12, 10, 9, 13, 10, 12), strict=True)))
    rows = []
    for n in lengths:
        q, k, v = (torch.randn(batch_size, num_heads, n, head_dim, device=dev) for _ in range(3))
        calls = {
            "readable": functools.partial(scaled_dot_product_attention, q, k, v, fused=False),
            "fused": functools.partial(scaled_dot_product_attention, q, k, v),
        }
        row = {"n": n, "weights_mib": batch_size * num_heads * n * n * 4 / 2**20}  # the (B, H, N, N) float32 weights
        with torch.inference_mode():
            for label, fn in calls.items():
                timer = Timer("fn()", globals={"fn": fn}, num_threads=threads)
                row[f"{label}_ms"] = timer.blocked_autorange(min_run_time=min_time).median * 1e3
                row[f"{label}_mib"] = peak_mib(fn)
        rows.append(row)
        speedup = row["readable_ms"] / row["fused_ms"]
        print(
            f"{n:>6} {row['readable_ms']:>12.3f} {row['fused_ms']:>10.3f} {speedup:>8.1f}x "
            f"{row['readable_mib']:>13.1f} {row['fused_mib']:>10.1f} {row['weights_mib']:>12.1f}"
        )
    return rows


def bench_text(device: str | None = None, name: str | None = None, repeats: int = 5) -> list[float]:
    """Print (and return) the seconds to embed every CIFAR-10 prompt of every template, cache emptied each time."""
    dev = _device(device, torch.device("cpu"))  # TextEncoder's default device; checked before anything loads

    import statistics
    import time

    from companion.data import CIFAR10_CLASSES
    from companion.llm import TEMPLATES, TextEncoder, class_embeddings

    start = time.perf_counter()
    encoder = TextEncoder(name, device=dev)
    print(f"device: {dev} ({_device_name(dev)}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{encoder.name} loaded in {time.perf_counter() - start:.1f} s (not counted below)")
    class_embeddings(encoder, ["warm-up"], TEMPLATES[:1])  # the first call pays one-off set-up costs
    seconds = []
    for _ in range(repeats):
        encoder._cache.clear()  # embed every prompt again, as on first use
        start = time.perf_counter()
        class_embeddings(encoder, CIFAR10_CLASSES, TEMPLATES)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds.append(time.perf_counter() - start)
    n = len(CIFAR10_CLASSES) * len(TEMPLATES)
    print(
        f"{n} prompts ({len(CIFAR10_CLASSES)} classes x {len(TEMPLATES)} templates) embedded and ensembled: "
        f"median {statistics.median(seconds):.2f} s, best {min(seconds):.2f} s, worst {max(seconds):.2f} s "
        f"over {repeats} runs"
    )
    return seconds


def bench_step(
    device: str | None = None,
    models: tuple[str, ...] = ("cnn", "vit"),
    batch_sizes: tuple[int, ...] = (64, 128, 256, 512),
    steps: int = 5,
) -> list[dict]:
    """Print (and return) the time of one training step of the recipes' models per batch size and precision.

    A step is what ``fit`` does per batch: forward under the precision's autocast, label-smoothed cross-entropy,
    backward, the recipe's optimiser step. Random images, ``steps`` timed steps after two untimed ones.
    """
    import time

    import torch.nn.functional as F

    from companion.optim import make_optimizer
    from companion.recipes.cnn import CNN_RECIPE, make_cnn
    from companion.recipes.vit import VIT_RECIPE, make_vit
    from companion.runtime import autocast_dtype, seed_everything
    from companion.runtime import device as best_device

    dev = _device(device, best_device())
    precisions = ["fp32"] + (["bf16"] if autocast_dtype(dev, "bf16") is not None else [])
    print(f"device: {dev} ({_device_name(dev)}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"one training step (forward, loss, backward, optimiser step), median of {steps} after 2 warm-up steps")
    print(f"{'model':>22} {'batch':>6} {'precision':>9} {'ms/step':>9} {'images/s':>9}")
    rows = []
    for name in models:
        seed_everything(0)
        recipe = {"cnn": CNN_RECIPE, "vit": VIT_RECIPE}[name]
        if name == "cnn":
            model = make_cnn(recipe, torch.randn(256, 3, 32, 32)).to(dev)
            title = f"FastCNN{recipe.widths}"
        else:
            model = make_vit(recipe).to(dev)
            title = f"ViT dim {recipe.dim} depth {recipe.depth}"
        optimizer = make_optimizer(model, recipe.train)
        for batch in batch_sizes:
            x = torch.randn(batch, 3, 32, 32, device=dev)
            y = torch.randint(0, 10, (batch,), device=dev)
            for precision in precisions:
                dtype = autocast_dtype(dev, precision)
                times = []
                for i in range(steps + 2):
                    start = time.perf_counter()
                    with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                        loss = F.cross_entropy(model(x).float(), y, label_smoothing=recipe.label_smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    if i >= 2:
                        times.append(time.perf_counter() - start)
                ms = 1e3 * sorted(times)[len(times) // 2]
                rows.append({"model": title, "batch": batch, "precision": precision, "ms": ms})
                print(f"{title:>22} {batch:>6} {precision:>9} {ms:>9.1f} {batch / ms * 1e3:>9.0f}")
    return rows
