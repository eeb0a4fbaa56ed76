"""
The cloud benchmark: JD (deployed, on the fast path of extras/fast_cloud.py) against Ahuja et
al.'s SD + D per image at a preset's networks and resolution, random weights, the same bytes:
entropy decoding, network and mask tail apart, latency at batch 1 and throughput at a batch.
Results and their history: docs/experiments.md, "The cloud benchmark". And the training step of
both, E (and Ahuja's D) frozen and trained on (train.py --freeze-encoder), with peak memory.

    python evaluate.py --benchmark cloud --dataset cityscapes [--device cuda] [--json bench.json]
    python evaluate.py --benchmark train --dataset synthetic [--device cuda] [--batch-size 2]
"""
import argparse
import math
import os
import resource
import time

import numpy as np
import torch
from torch.nn.functional import cross_entropy

import entropy
from data import DATASETS, preset
from entropy import split_parameters
from extras.complexity import RESOLUTIONS
from extras.fast_cloud import low_res_logits, speed_up, upsampled_masks
from model import build_model
from reparam import reparameterize


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    if os.path.exists("/proc/self/status"):  # Linux: the peak RSS since the last reset_peak_memory
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # macOS: bytes, the process's peak


def latent_at_rate(hp, h_a, batch, size, bpp, seed=0):
    """Byte strings of `batch` random latents of an image of `size` that cost about `bpp` with
    this coder: r = round(s * noise), s found by bisection on the real bytes (the benchmark's
    models are untrained, so a trained latent's statistics are not at hand)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, hp.M, *entropy.latent_size(size), generator=g)

    def code(s):
        r = torch.round(s * noise)
        strings = hp.compress(r, h_a(r.abs()), size)
        return strings, 8 * sum(map(len, strings)) / (batch * size[0] * size[1])

    lo, hi = 0.05, 4.0  # scales of r: about 0.01 to 2 bpp
    for _ in range(12):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if code(mid)[1] < bpp else (lo, mid)
    return code(math.sqrt(lo * hi))


def median_seconds(fns, device, runs):
    """Median seconds of each of the functions run in turn, `runs` times."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(runs):
        t = [time.perf_counter()]
        for fn in fns:
            fn()
            sync()
            t.append(time.perf_counter())
        times.append(np.diff(t))
    return [float(np.median(column)) for column in zip(*times)]


@torch.inference_mode()
def benchmark_cloud(dataset="cityscapes", size=None, batch=4, repeat=3, device="cpu", bpp=0.2, seed=0,
                    min_seconds=10):
    """The cloud of JD (deployed: fused, with fast_cloud.speed_up's forwards) and of Ahuja et al.'s
    SD + D at a preset's networks and resolution, random weights: latency per image at batch 1
    and throughput at `batch`, entropy decoding, network and mask tail apart. A latency is the
    median of at least `repeat` runs and of at least `min_seconds` of runs, after a warm-up:
    JD's runs are short. Both decode the same bytes (JD's entropy models are copied into the
    Ahuja model), so the networks make the difference."""
    cfg = preset(dataset)
    H, W = size or RESOLUTIONS[dataset][1]
    torch.manual_seed(seed)
    models = {"jd": speed_up(reparameterize(build_model({**cfg, "decoder": "jd"}).eval())),
              "ahuja": speed_up(build_model({**cfg, "decoder": "ahuja"}).eval())}
    models["jd"].hyperprior.update()  # the CDF tables, built once on the CPU and shared (tables built
    models["ahuja"].hyperprior.load_state_dict(models["jd"].hyperprior.state_dict())  # on a GPU can differ,
    #                                                   and then the model ids that the container checks)
    strings, bpp_real = latent_at_rate(models["jd"].hyperprior, models["jd"].SE.h_a, batch, (H, W), bpp, seed)
    out = {"dataset": dataset, "size": [H, W], "bpp": bpp_real, "bytes_per_image": sum(map(len, strings)) / batch,
           "batch": batch, "repeat": repeat, "device": device, "threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None}

    def timed(fns):  # medians after a warm-up, and the number of runs
        runs = max(repeat, math.ceil(min_seconds / sum(median_seconds(fns, device, 1))))
        return median_seconds(fns, device, runs), runs

    # the mask tail alone, on logits of the networks' output shape: the same work for both
    logits = torch.randn(1, cfg["num_classes"], -(-H // 8), -(-W // 8), device=device)
    (tail_s,), out["tail_runs"] = timed([lambda: upsampled_masks(logits, (H, W))])
    out["tail_ms"] = 1e3 * tail_s
    for name, model in models.items():
        model.to(device)
        model.hyperprior.update()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)

        def steps(n):  # entropy decoding, then the network and the mask tail
            decoded = {}
            return [lambda: decoded.update(r_hat=model.hyperprior.decompress(strings[:n])[0]),
                    lambda: upsampled_masks(low_res_logits(model, decoded["r_hat"], (H, W)), (H, W))]

        (entropy_s, cloud_s), out[f"{name}_runs"] = timed(steps(1))
        out.update({f"{name}_entropy_ms": 1e3 * entropy_s, f"{name}_network_ms": 1e3 * cloud_s - out["tail_ms"],
                    f"{name}_total_ms": 1e3 * (entropy_s + cloud_s),
                    f"{name}_images_per_s": batch / sum(median_seconds(steps(batch), device, 1)),
                    f"{name}_peak_memory_mb": peak_memory_mb(device)})
        model.cpu()
    out["ratio_total"] = out["jd_total_ms"] / out["ahuja_total_ms"]
    out["ratio_network"] = out["jd_network_ms"] / out["ahuja_network_ms"]
    return out


def print_benchmark(b):
    where = f"{b['device']} ({b['gpu']}; entropy decoding on the CPU, " if b.get("gpu") else f"{b['device']} ("
    print(f"cloud, {b['dataset']} networks at {b['size'][0]}x{b['size'][1]} on {where}{b['threads']} threads), random "
          f"weights; latents at {b['bpp']:.3f} bpp ({b['bytes_per_image']:.0f} bytes per image)")
    print(f"latency per image at batch 1 (ms, medians after a warm-up: JD {b['jd_runs']} runs, Ahuja et al. "
          f"{b['ahuja_runs']}, mask tail {b['tail_runs']}); throughput at batch {b['batch']}")
    print(f"{'cloud':22s} {'entropy dec.':>12s} {'network':>9s} {'mask tail':>10s} {'total':>9s} {'images/s':>9s} "
          f"{'peak MB':>8s}")
    for name, label in (("jd", "JD (deployed)"), ("ahuja", "Ahuja et al. SD + D")):
        v = [b[f"{name}_{k}"] for k in ("entropy_ms", "network_ms", "total_ms", "images_per_s", "peak_memory_mb")]
        print(f"{label:22s} {v[0]:12.1f} {v[1]:9.1f} {b['tail_ms']:10.1f} {v[2]:9.1f} {v[3]:9.3f} {v[4]:8.0f}")
    print(f"{'JD / Ahuja':22s} {b['jd_entropy_ms'] / b['ahuja_entropy_ms']:12.1%} {b['ratio_network']:9.1%} "
          f"{'':10s} {b['ratio_total']:9.1%} {b['jd_images_per_s'] / b['ahuja_images_per_s']:8.1f}x")
    print("(mask tail: bilinear upsampling of the S logit maps to H x W and the per-pixel class, the same work for "
          "both, timed alone; network = the cloud network's time less it)")
    if not b["device"].startswith("cuda"):
        print("(peak MB on the CPU is the process's peak resident memory so far: JD runs first)")


def reset_peak_memory(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak RSS (VmHWM) to the current
            f.write("5")


def benchmark_training(dataset="synthetic", size=None, batch=None, steps=10, device="cpu", seed=0, Ks=None,
                       encoder=None):
    """Training steps of JD and of Ahuja et al. at a preset's networks, crop and batch, with E
    (and Ahuja's D) frozen as train.py --freeze-encoder does, and trained on: the median step
    (forward, J of Eq. 3, backward, both Adam steps) after five warm-up steps, on random images
    and labels, and the peak memory of each configuration. With Ks: JD at each K instead (Fig. 8's
    training cost; the deployed cloud is the same for every K, evaluate.py --complexity --K)."""
    cfg = {**preset(dataset), **({"encoder": encoder} if encoder else {})}
    H, W = size or (cfg["size"] if dataset == "synthetic" else (cfg["crop"], cfg["crop"]))
    batch = batch or cfg["batch_size"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, H, W, generator=g).to(device)
    y = torch.randint(cfg["num_classes"], (batch, H, W), generator=g).to(device)
    out = {"dataset": dataset, "encoder": cfg["encoder"], "size": [H, W], "batch": batch, "steps": steps,
           "device": device, "threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None}
    systems = [(f"jd_K{K}", "jd", {"K": K}) for K in Ks] if Ks else [("jd", "jd", {}), ("ahuja", "ahuja", {})]
    out["systems"] = [name for name, _, _ in systems]
    # the first configuration twice, its first numbers overwritten: a process's first configuration
    # ran ~25 % slower whatever its warm-up (glibc returning its memory between steps)
    for system, decoder, change in systems[:1] + systems:
        for frozen in (True, False):
            torch.manual_seed(seed)
            model = build_model({**cfg, "decoder": decoder, **change}).to(device)
            fixed = ([model.E] + ([model.D] if decoder == "ahuja" else [])) if frozen else []
            for m in fixed:
                m.requires_grad_(False)
            main_params, aux_params = split_parameters(model)
            optimizer = torch.optim.Adam([p for p in main_params if p.requires_grad], lr=1e-4)
            aux_optimizer = torch.optim.Adam(aux_params, lr=1e-4)

            def step():
                model.train()
                for m in fixed:
                    m.eval()
                o = model(x)
                loss = cfg["alpha"] * cross_entropy(o["logits"], y) + \
                    (1 - cfg["alpha"]) * entropy.bits_per_pixel(o["likelihoods"], x.numel() // 3)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                aux_optimizer.zero_grad(set_to_none=True)
                model.hyperprior.aux_loss().backward()
                aux_optimizer.step()
            median_seconds([step], device, 5)  # warm-up
            reset_peak_memory(device)
            (step_s,) = median_seconds([step], device, steps)
            name = f"{system}_{'frozen' if frozen else 'trained_on'}"
            out.update({f"{name}_ms": 1e3 * step_s, f"{name}_peak_memory_mb": peak_memory_mb(device)})
            model = optimizer = aux_optimizer = None  # freed before the next configuration is built
    return out


def print_training(b):
    where = f"{b['device']} ({b['gpu']})" if b.get("gpu") else f"{b['device']} ({b['threads']} threads)"
    print(f"training steps, {b['dataset']} preset ({b.get('encoder')}) at {b['size'][0]}x{b['size'][1]}, batch "
          f"{b['batch']}, on {where}: median of {b['steps']} steps after a warm-up, random weights and data")
    print(f"{'system':22s} {'E (and D) frozen':>22s} {'trained on':>22s}")
    labels = {"jd": "JD", "ahuja": "Ahuja et al. SD + D"}
    for name in b.get("systems", ["jd", "ahuja"]):
        label = labels.get(name, name.replace("jd_", "JD, "))
        cells = [f"{b[f'{name}_{r}_ms']:8.0f} ms {b[f'{name}_{r}_peak_memory_mb']:6.0f} MB"
                 for r in ("frozen", "trained_on")]
        print(f"{label:22s} {cells[0]:>22s} {cells[1]:>22s}")
    print("(peak MB: " + ("torch.cuda.max_memory_allocated" if b.get("gpu") else "the process's peak resident memory "
          "during the steps, reset before each configuration") + ")")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", choices=["cloud", "train"], required=True,
                   help="cloud: JD's and Ahuja's clouds decoding; train: their training steps, E frozen and trained on")
    p.add_argument("--dataset", default="cityscapes", choices=DATASETS, help="preset networks (data.PRESETS)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="input size (default: "
                   "the preset's cloud resolution)")
    p.add_argument("--batch-size", type=int, default=4, help="the throughput batch (default %(default)s)")
    p.add_argument("--repeat", type=int, default=3,
                   help="the least number of runs after one warm-up (and at least 10 s of them)")
    p.add_argument("--bpp", type=float, default=0.2, help="the latent rate (default %(default)s: inside Fig. 5's "
                   "0.02-0.3 bpp)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--steps", type=int, default=10, help="train: timed steps (default %(default)s)")
    p.add_argument("--K", type=int, nargs="+", default=None, help="train: JD at each of these K instead (Fig. 8)")
    p.add_argument("--encoder", default=None, choices=["resnet50", "resnet101", "resnet18-l2"],
                   help="train: E instead of the preset's")
    args = p.parse_args(argv)
    if args.benchmark == "train":
        out = benchmark_training(args.dataset, args.size, args.batch_size if "--batch-size" in argv else None,
                                 args.steps, args.device, Ks=args.K, encoder=args.encoder)
        print_training(out)
    else:
        out = benchmark_cloud(args.dataset, args.size, args.batch_size, args.repeat, args.device, args.bpp)
        print_benchmark(out)
    return out, args.json
