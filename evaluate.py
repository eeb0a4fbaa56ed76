"""
Evaluation of the distributed segmenters: mIoU and real bits, the edge/cloud split on files,
RD curves against the baselines and the conventional pipelines (JPEG, WebP, AVIF, HEVC, a
learned image codec), pictures, the cloud benchmark, and complexity.

    python evaluate.py --ckpt out/synthetic/ckpt.pt [--json m.json]   # mIoU, per-class IoU, bpp
    python evaluate.py --ckpt out/synthetic/ckpt.pt --save-bitstreams bits/  # the edge: a file per image
    python evaluate.py --ckpt out/synthetic/ckpt.pt --from-bitstreams bits/  # the cloud: masks from files
    python evaluate.py --ckpt out/synthetic/ckpt.pt --save-vis vis/   # image | ground truth | prediction
    python evaluate.py --rd runs/*/ckpt.pt --plot rd.png --csv rd.csv  # Fig. 5 with JPEG; prints JD vs
                                                                       # Ahuja at equal bpp, JPEG vs both
    python evaluate.py --rd runs/*/ckpt.pt --image-codecs jpeg,webp,avif,hevc,learned  # Fig. 1a
    python evaluate.py --benchmark cloud --dataset cityscapes  # JD vs Ahuja SD+D: latency, throughput
    python evaluate.py --complexity --dataset cityscapes       # Tables 2 and 4, counted
"""
import argparse
import io
import json
import math
import os
import re
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from torch.utils.flop_counter import FlopCounterMode

import entropy  # first: it silences compressai's import-time warning
from compressai.models import ScaleHyperprior  # noqa: E402  (the learned codec of Fig. 1a)
from compressai.zoo.image import model_urls  # noqa: E402
from compressai.zoo.pretrained import load_pretrained  # noqa: E402
from data import DATASETS, MEAN, STD, colorize, denormalize, normalize, preset, val_dataset
from entropy import bits_per_pixel
from model import build_model, hub_file, load_checkpoint, masks, read_checkpoint, read_weights, upsampled_masks
from reparam import reparameterize, speed_up

# -----------------------------------------------------------------------------
# mIoU and bits


def confusion_matrix(pred, target, S):
    """(S, S) counts, rows = ground truth, columns = prediction; labels outside 0..S-1
    (255 = ignore) drop out."""
    keep = (target >= 0) & (target < S)
    return torch.bincount(S * target[keep] + pred[keep], minlength=S * S).reshape(S, S).cpu()


def iou(cm):
    """Per-class IoU from a confusion matrix summed over the whole set, and their mean over
    the classes that occur (nan where a class is neither in the labels nor predicted)."""
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    per_class = inter / union  # nan for 0/0
    return per_class.nanmean().item(), per_class.tolist()


def num_classes(model):
    return (model.JD if model.decoder == "jd" else model.D).classifier.out_channels


# image quality, for the image-output decoders (the learned codec, the attacker)


def image_mse(x_hat, x):
    """Per-image mean squared error (B,) of two normalized batches, in [0, 1] image units."""
    std = torch.tensor(STD, device=x.device).reshape(1, 3, 1, 1)
    return ((x_hat - x) * std).pow(2).flatten(1).mean(1)


def to_unit(x):
    """A normalized batch (B, 3, H, W) -> RGB in [0, 1], clamped."""
    mean, std = (torch.tensor(v, device=x.device).reshape(1, 3, 1, 1) for v in (MEAN, STD))
    return (x * std + mean).clamp(0, 1)


def as_shown(x):
    """A normalized batch -> the image as a screen shows it: RGB in [0, 1], rounded to 8 bits."""
    return torch.round(255 * to_unit(x)) / 255


def psnr(x_hat, x):
    """PSNR in dB (B,) of [0, 1] images: 10 log10(1 / MSE)."""
    return -10 * torch.log10((x_hat - x).pow(2).flatten(1).mean(1).clamp(min=1e-10))


def ssim(x_hat, x, window=11, sigma=1.5):
    """SSIM (B,) of [0, 1] images [Wang et al. 2004]: per channel, local means, variances and
    covariance under an 11x11 Gaussian window (sigma 1.5, valid positions only), C1 = 0.01^2,
    C2 = 0.03^2, the map averaged over positions and channels."""
    t = torch.arange(window, dtype=x.dtype, device=x.device) - (window - 1) / 2
    g = torch.exp(-t**2 / (2 * sigma**2))
    g = (g[:, None] * g[None, :] / g.sum() ** 2).expand(x.shape[1], 1, window, window)

    def blur(v):
        return torch.nn.functional.conv2d(v, g, groups=x.shape[1])

    mu_x, mu_y = blur(x_hat), blur(x)
    var_x, var_y = blur(x_hat * x_hat) - mu_x**2, blur(x * x) - mu_y**2
    cov = blur(x_hat * x) - mu_x * mu_y
    C1, C2 = 0.01**2, 0.03**2
    s = (2 * mu_x * mu_y + C1) * (2 * cov + C2) / ((mu_x**2 + mu_y**2 + C1) * (var_x + var_y + C2))
    return s.flatten(1).mean(1)


def quality(m):
    """"mIoU 0.7627" for a segmenter's metrics, "PSNR 24.31 dB, SSIM 0.712" for an image decoder's."""
    return f"PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}" if "psnr" in m else f"mIoU {m['miou']:.4f}"


@torch.no_grad()
def evaluate(model, dataset, device, batch_size=8, real_bits=True, rank=0, world_size=1):
    """mIoU over `dataset`, and bits per pixel: from the real byte strings (the whole
    container, header included) and from the likelihoods, Eq. (1). With real_bits, the
    masks come from the cloud decoding the edge's bytes (model.compress, model.decompress);
    without, from the eval-mode forward. Each rank evaluates every world_size-th image; the
    counts are summed across ranks, so none is counted twice."""
    model.eval()
    image_out = model.image_out  # the learned codec and the attacker rebuild x: PSNR and SSIM
    S = 1 if image_out else num_classes(model)
    compressed = model.decoder != "none"
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size)
    cm = torch.zeros(S, S, dtype=torch.int64)
    stats = torch.zeros(7, dtype=torch.float64)  # real bits, est. bits, pixels, images, refused, PSNR, SSIM
    refused = None
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
        out = model(x)  # eval mode: rounded latents, the likelihoods of Eq. (1); with real bits E
        #                 runs again in compress: one path, the deployed one, at twice E's cost
        logits = out["x_hat" if image_out else "logits"]
        if compressed:
            stats[1] += bits_per_pixel(out["likelihoods"], pixels).item() * pixels
        if compressed and real_bits and refused is None:
            try:
                strings = model.compress(x)  # the edge
            except ValueError as e:  # latents the coder cannot take (an untrained or diverged
                refused, stats[4] = str(e), 1  # model): no real bits; masks of the eval forward
            else:
                stats[0] += 8 * sum(len(s) for s in strings)
                logits = model.decompress(strings)  # the cloud, from the bytes alone
        if image_out:  # the image as the cloud would show it
            x_hat, x01 = as_shown(logits), as_shown(x)
            stats[5] += psnr(x_hat, x01).sum().item()
            stats[6] += ssim(x_hat, x01).sum().item()
        else:
            cm += confusion_matrix(masks(logits), y, S)
        stats[2] += pixels
        stats[3] += x.shape[0]
    if world_size > 1:
        cm, stats = cm.to(device), stats.to(device)
        dist.all_reduce(cm)
        dist.all_reduce(stats)
        cm, stats = cm.cpu(), stats.cpu()
    miou, per_class = iou(cm)
    coded = compressed and real_bits and stats[4] == 0
    scores = {"psnr": (stats[5] / stats[3]).item(), "ssim": (stats[6] / stats[3]).item()} if image_out else \
        {"miou": miou, "iou": per_class}
    return {**scores, "n_images": int(stats[3]),
            "bpp_real": (stats[0] / stats[2]).item() if coded else None,
            "bpp_est": (stats[1] / stats[2]).item() if compressed else None,
            **({"refused": refused or "on another process"} if stats[4] else {})}


# -----------------------------------------------------------------------------
# the edge/cloud split on disk: one self-describing file per image

SUFFIX = ".dssj"


@torch.no_grad()
def save_bitstreams(model, dataset, out_dir, device, split="val", batch_size=8):
    """The edge alone: image i of the split becomes out_dir/{split}_{i:05d}.dssj."""
    os.makedirs(out_dir, exist_ok=True)
    n = total = 0
    for x, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        for s in model.compress(x.to(device)):
            with open(os.path.join(out_dir, f"{split}_{n:05d}{SUFFIX}"), "wb") as f:
                f.write(s)
            n, total = n + 1, total + len(s)
    return n, total


@torch.no_grad()
def from_bitstreams(model, dataset, in_dir, device, split="val", return_masks=False):
    """The cloud alone: decode every file of in_dir and score the mask against the label of
    the image its name points to. A file that is corrupt, foreign, or written by another
    model is reported by name and skipped, never decoded into garbage."""
    model.eval()
    S = num_classes(model)
    cm = torch.zeros(S, S, dtype=torch.int64)
    bits = pixels = decoded = 0
    refused, decoded_masks = [], {}
    for name in sorted(os.listdir(in_dir)):
        path = os.path.join(in_dir, name)
        match = re.fullmatch(rf"{split}_(\d+){re.escape(SUFFIX)}", name)
        try:
            if not match or not os.path.isfile(path):
                raise ValueError(f"not a bitstream file of this split ({split}_NNNNN{SUFFIX})")
            if int(match[1]) >= len(dataset):
                raise ValueError(f"the {split} split has no image {int(match[1])}")
            if os.path.getsize(path) > entropy.max_container_bytes(model.hyperprior.N, model.hyperprior.M):
                raise ValueError(f"{os.path.getsize(path)} bytes: larger than any bitstream of this model")
            with open(path, "rb") as f:
                data = f.read()
            pred = model.segment([data])[0]
            _, y = dataset[int(match[1])]
            if pred.shape != y.shape:
                raise ValueError(f"decodes to {tuple(pred.shape)}, but image {int(match[1])} is {tuple(y.shape)}")
        except (ValueError, OSError) as e:
            print(f"refused {name}: {e}")
            refused.append((name, str(e)))
            continue
        cm += confusion_matrix(pred, y.to(device), S)
        bits, pixels, decoded = bits + 8 * len(data), pixels + y.numel(), decoded + 1
        if return_masks:
            decoded_masks[name] = pred.cpu()
    miou, per_class = iou(cm)
    m = {"miou": miou, "iou": per_class, "bpp_real": bits / max(pixels, 1), "n_images": decoded,
         "n_refused": len(refused), "refused": refused}
    return (m, decoded_masks) if return_masks else m


# -----------------------------------------------------------------------------
# the conventional pipelines (Fig. 1a): code the image, decode it, segment the decoded image

# codec -> (label, Pillow format, qualities of its RD sweep). bpp counts every byte of the
# file sent: at 128x256 a HEIF container's ~400 fixed bytes are 0.1 bpp, AVIF's ~300.
# "learned" stands in for Song et al.'s codec: CompressAI's scale hyperprior [Balle et al.
# 2018] (bmshj2018_hyperprior, MSE), its pretrained weights for qualities 1-6 downloaded once
IMAGE_CODECS = {
    "jpeg": ("JPEG", "JPEG", [2, 5, 10, 20, 35, 50, 75, 90]),
    "webp": ("WebP", "WEBP", [0, 5, 10, 20, 35, 50, 75, 90]),
    "avif": ("AVIF", "AVIF", [0, 10, 20, 35, 50, 60, 75]),
    "hevc": ("HEVC (x265 intra)", "HEIF", [0, 10, 20, 30, 40, 50]),  # x265, not the HM reference encoder
    "learned": ("learned (scale hyperprior)", None, [1, 2, 3, 4, 5, 6]),
}


def image_codec_format(codec):
    """Pillow's format for `codec`, after checking that it can run here: HEVC needs the
    optional pillow-heif (GPL wheels), the learned codec its weights."""
    if codec not in IMAGE_CODECS:
        raise ValueError(f"unknown image codec {codec!r}; choose from {', '.join(IMAGE_CODECS)}")
    if codec == "hevc":
        try:
            import pillow_heif
        except ImportError:
            raise ValueError("HEVC needs pillow-heif (libheif + x265): pip install pillow-heif") from None
        pillow_heif.register_heif_opener()
    if codec == "learned" and not OWN_CODECS:
        for q in IMAGE_CODECS[codec][2]:
            hub_file(model_urls["bmshj2018-hyperprior"]["mse"][q])  # downloaded once, or one clear line
    return IMAGE_CODECS[codec][1]


LEARNED = {}  # quality -> the loaded codec
OWN_CODECS = {}  # quality -> the project's codec (train.py --decoder codec), if use_learned_codecs


def use_learned_codecs(paths):
    """Make "learned" the project's own codecs: train.py --decoder codec checkpoints, one per
    rate, numbered 1, 2, ... by increasing alpha (more bits) as its qualities."""
    codecs = [load_checkpoint(p) for p in paths]
    if any(ckpt["args"]["decoder"] != "codec" for _, ckpt in codecs):
        raise ValueError("--learned-codec takes checkpoints of train.py --decoder codec")
    codecs.sort(key=lambda mc: mc[1]["args"]["alpha"])
    OWN_CODECS.clear()
    OWN_CODECS.update({q: model for q, (model, _) in enumerate(codecs, 1)})
    IMAGE_CODECS["learned"] = ("learned (scale hyperprior, ours)", None, list(OWN_CODECS))


def learned_codec(quality):
    """CompressAI's pretrained scale hyperprior for `quality`, from the torch hub cache
    (weights_only loading), with its CDF tables."""
    if quality not in LEARNED:
        state_dict = read_weights(hub_file(model_urls["bmshj2018-hyperprior"]["mse"][quality]))
        LEARNED[quality] = ScaleHyperprior.from_state_dict(load_pretrained(state_dict)).eval()
        LEARNED[quality].update(force=True)
    return LEARNED[quality]


@torch.no_grad()
def code_image(image, codec, quality):
    """uint8 (H, W, 3) -> (the decoded uint8 image, the number of bytes sent)."""
    if codec == "learned" and quality not in IMAGE_CODECS["learned"][2]:
        raise ValueError(f"the learned codec has the qualities {IMAGE_CODECS['learned'][2]}, not {quality}")
    if codec == "learned" and OWN_CODECS:  # our container, header included, as for JD's bits
        net = OWN_CODECS[quality]
        strings = net.compress(normalize(image)[None])
        return denormalize(net.decompress(strings)[0]), len(strings[0])
    if codec == "learned":  # the image padded to a multiple of 64 (g_a's and h_a's strides)
        net, (H, W) = learned_codec(quality), image.shape[:2]
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        x = torch.nn.functional.pad(x, [0, -W % 64, 0, -H % 64])
        coded = net.compress(x)
        n_bytes = 4 + sum(len(s[0]) for s in coded["strings"])  # + H and W, 16 bits each
        x_hat = net.decompress(coded["strings"], coded["shape"])["x_hat"][0, :, :H, :W]
        return (x_hat.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy(), n_bytes
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, image_codec_format(codec), quality=quality)
    n_bytes = buf.tell()
    buf.seek(0)
    return np.array(Image.open(buf).convert("RGB")), n_bytes


def code_images(x, codec, quality):
    """A normalized batch (B, 3, H, W) through the codec: (decoded batch, bytes sent)."""
    decoded = [code_image(denormalize(xi), codec, quality) for xi in x.cpu()]
    return torch.stack([normalize(d) for d, _ in decoded]).to(x.device), sum(n for _, n in decoded)


@torch.no_grad()
def codec_rd(model, dataset, device, codec, qualities=None, batch_size=8):
    """Fig. 1a: each image coded and decoded by `codec` at each quality; bpp from the bytes
    sent; the decoded image segmented by a No-Compression model (the plain one, or one
    fine-tuned on this codec's images: train.py --image-codec)."""
    model.eval()
    S, rows = num_classes(model), []
    for q in qualities or IMAGE_CODECS[codec][2]:
        cm = torch.zeros(S, S, dtype=torch.int64)
        bits = pixels = 0
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            decoded, n_bytes = code_images(x, codec, q)
            bits, pixels = bits + 8 * n_bytes, pixels + x.shape[0] * x.shape[-2] * x.shape[-1]
            cm += confusion_matrix(masks(model(decoded.to(device))["logits"]), y.to(device), S)
        rows.append({"method": codec, "quality": q, "bpp_real": bits / pixels, "miou": iou(cm)[0]})
    return rows


# -----------------------------------------------------------------------------
# rate-distortion curves (Fig. 5)


def rd_points(ckpts, device, split="val", limit=None, data_root=None, codecs=("jpeg",), qualities=None):
    """One row per checkpoint (mIoU, real and estimated bpp), plus the conventional pipelines'
    points for each No-Compression checkpoint: every codec of `codecs` for a plain one, its
    own codec for one fine-tuned on decoded images (train.py --image-codec)."""
    rows = []
    for path in ckpts:
        model, ckpt = load_checkpoint(path, device)
        speed_up(model)  # a deployed JD runs its faster forwards
        cfg = ckpt["args"]
        if model.image_out:
            print(f"{path}: left out, a {cfg['decoder']} model rebuilds images (codec: --learned-codec; "
                  "inversion: --privacy)")
            continue
        ds, _ = val_dataset(cfg, split, limit, data_root)
        m = evaluate(model, ds, device)
        if "refused" in m:
            print(f"{path}: left out, it has no bitstream: {m['refused']}")
            continue
        coded = cfg["decoder"] != "none"  # alpha and K mean nothing without compression
        tuned = cfg.get("image_codec")  # a No-Compression model fine-tuned on this codec's images
        row = {"checkpoint": path, "dataset": cfg["dataset"], "system": cfg["decoder"], "finetuned": None,
               "alpha": cfg.get("alpha") if coded else None, "K": cfg["K"] if coded else None,
               "seed": cfg.get("seed", 0)}
        if not tuned:
            rows.append({**row, "method": cfg["decoder"], "bpp_real": m["bpp_real"], "bpp_est": m["bpp_est"],
                         "miou": m["miou"]})
            print(f"{path}: {cfg['decoder']}, mIoU {m['miou']:.4f}, bpp {m['bpp_real']}")
        if cfg["decoder"] == "none":
            for codec in [tuned] if tuned else codecs:
                for r in codec_rd(model, ds, device, codec, qualities):
                    rows.append({**row, **r, "system": codec, "finetuned": bool(tuned),
                                 "method": codec + ("-ft" if tuned else "")})
                    print(f"  {IMAGE_CODECS[codec][0]}{' fine-tuned' if tuned else ''} q={r['quality']}: "
                          f"mIoU {r['miou']:.4f}, bpp {r['bpp_real']:.4f}")
    return rows


def miou_at(points, bpp):
    """mIoU of an RD curve (sorted (bpp, mIoU) points) at `bpp`, linear in log(bpp) between
    its neighbours as on the log axis of Fig. 5; None outside the curve's rate range."""
    for (b0, m0), (b1, m1) in zip(points, points[1:]):
        if b0 <= bpp <= b1:
            t = 0.0 if b1 == b0 else math.log(bpp / b0) / math.log(b1 / b0)
            return m0 + t * (m1 - m0)
    return points[0][1] if len(points) == 1 and points[0][0] == bpp else None


def codec_label(method):
    """"jpeg" -> "JPEG", "hevc-ft" -> "HEVC (x265 intra), fine-tuned"."""
    if method == "jsde":
        return "JSDE (Torfason et al., Fig. 1b)"
    codec, _, ft = method.partition("-")
    return IMAGE_CODECS[codec][0] + (", fine-tuned" if ft else "")


def rd_compare(rows):
    """The RD claims as numbers, from rd_points' rows:
    - each JD point against Ahuja's curve of the same seed at the same real bpp (and each
      Ahuja point against JD's): difference in mIoU, None outside the other curve's rates;
    - each point of each conventional pipeline (codec, plain or fine-tuned) and of JSDE against
      the best feature-coding point (JD or Ahuja) that needs no more bits: a positive margin
      means feature coding is better at that rate."""
    curves = {}
    for r in rows:
        curves.setdefault(r["method"], []).append((r["bpp_real"], r["miou"]))
    curves = {m: sorted(pts) for m, pts in curves.items()}
    out = {"jd_vs_ahuja": [], "feature_vs_codec": {}}
    seeds = sorted({r.get("seed", 0) for r in rows if r["method"] in ("jd", "ahuja")})
    for seed in seeds:  # one curve per method and seed
        curve = {m: sorted((r["bpp_real"], r["miou"]) for r in rows if r["method"] == m and r.get("seed", 0) == seed)
                 for m in ("jd", "ahuja")}
        for m, other in (("jd", "ahuja"), ("ahuja", "jd")):
            for bpp, miou in curve[m]:
                ref = miou_at(curve[other], bpp) if curve[other] else None
                out["jd_vs_ahuja"].append({"at": m, "seed": seed, "bpp": bpp, "jd": miou if m == "jd" else ref,
                                           "ahuja": miou if m == "ahuja" else ref})
    feature = curves.get("jd", []) + curves.get("ahuja", [])
    for method in curves:
        if method.partition("-")[0] in IMAGE_CODECS or method == "jsde":
            out["feature_vs_codec"][method] = []
            for bpp, miou in curves[method]:
                best = max((mf for bf, mf in feature if bf <= bpp), default=None)
                out["feature_vs_codec"][method].append({"bpp": bpp, "codec": miou, "feature": best,
                                                        "margin": None if best is None else best - miou})
    return out


def print_rd_compare(c):
    print("JD vs Ahuja at equal real bpp (the other curve of the same seed interpolated on log bpp):")
    for r in c["jd_vs_ahuja"]:
        at = f"  seed {r['seed']} {r['at']:5s} point at {r['bpp']:.4f} bpp:"
        if r["jd"] is None or r["ahuja"] is None:
            print(f"{at} outside the other curve's rates")
        else:
            print(f"{at} JD {r['jd']:.4f}, Ahuja {r['ahuja']:.4f}, "
                  f"JD - Ahuja {100 * (r['jd'] - r['ahuja']):+.1f} points")
    for method, points in c["feature_vs_codec"].items():
        print(f"{codec_label(method)} vs the best feature coding (JD or Ahuja) at no more bits:")
        for r in points:
            best = "no feature point at that rate" if r["feature"] is None else \
                f"feature {r['feature']:.4f}, margin {100 * r['margin']:+.1f} points"
            print(f"  {r['bpp']:.4f} bpp: mIoU {r['codec']:.4f}; {best}")


def plot_rd(rows, path, title=""):
    """mIoU over bpp on a log axis, as the paper's Fig. 5."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    styles = {"jd": ("o-", "C3", "JD (ours, Fig. 1d)"), "ahuja": ("s-", "C0", "Ahuja et al. SD + D (Fig. 1c)"),
              "jsde": ("D-", "C8", "JSDE, Torfason et al. (Fig. 1b)")}
    for codec, colour in zip(IMAGE_CODECS, ("C2", "C4", "C5", "C1", "C6")):
        styles[codec] = ("^:", colour, f"{IMAGE_CODECS[codec][0]} + DeepLabv3 (Fig. 1a)")
        styles[codec + "-ft"] = ("^--", colour, f"{IMAGE_CODECS[codec][0]} + DeepLabv3 fine-tuned")
    for method, (marker, colour, label) in styles.items():
        for k, seed in enumerate(sorted({r.get("seed", 0) for r in rows if r["method"] == method})):
            pts = sorted((r["bpp_real"], r["miou"]) for r in rows if r["method"] == method and r.get("seed", 0) == seed)
            ax.plot(*zip(*pts), marker, color=colour, ms=4, alpha=1 if k == 0 else 0.45,
                    label=label if k == 0 else f"{label.split(' (')[0]}, seed {seed}")
    for r in rows:
        if r["method"] == "none":
            ax.axhline(r["miou"], color="k", ls=":", label="No Compression")
    ax.set_xscale("log")
    ax.set_xlabel("bits per pixel (real bitstreams and files)")
    ax.set_ylabel("mIoU")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -----------------------------------------------------------------------------
# pictures (Fig. 6)


def label_picture(panels, titles, classes=None, palette=None):
    """Panels side by side under their titles, with a colour legend of the classes below
    (none if classes is None)."""
    H, W = panels[0].shape[:2]
    font = ImageFont.load_default()
    entries = [(name, tuple(colour)) for name, colour in zip(classes, palette)] if classes else []
    if classes:
        entries.append(("ignore (255)", tuple(int(c) for c in colorize([[255]], palette)[0, 0])))
    legend, x, y = [], 4, 4  # (x, y, name, colour) in the legend strip, wrapped to the width
    for name, colour in entries:
        w = 16 + int(font.getlength(name)) + 10
        if x + w > len(panels) * W and x > 4:
            x, y = 4, y + 14
        legend.append((x, y, name, colour))
        x += w
    picture = Image.new("RGB", (len(panels) * W, 16 + H + y + 18), "white")
    draw = ImageDraw.Draw(picture)
    for k, (panel, title) in enumerate(zip(panels, titles)):
        picture.paste(Image.fromarray(panel), (k * W, 16))
        draw.text((k * W + 3, 2), title, fill="black", font=font)
    for x, y, name, colour in legend:
        draw.rectangle([x, 16 + H + y, x + 10, 16 + H + y + 10], fill=colour, outline="black")
        draw.text((x + 14, 16 + H + y), name, fill="black", font=font)
    return picture


@torch.no_grad()
def save_vis(model, dataset, classes, palette, out_dir, n, device):
    """n PNGs of image | ground truth | prediction (decoded from the bitstream) with titles
    and a colour legend; the image's bpp (real bytes) in the title and the file name."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(min(n, len(dataset))):
        x, y = dataset[i]
        if model.decoder == "none":
            logits, tag, title = model(x[None].to(device))["logits"], "nocompression", "prediction (no compression)"
        else:
            strings = model.compress(x[None].to(device))
            bpp = 8 * len(strings[0]) / y.numel()
            logits, tag, title = model.decompress(strings), f"{bpp:.4f}bpp", f"prediction from {bpp:.3f} bpp"
        pred = masks(logits)[0].cpu().numpy()
        panels = [denormalize(x), colorize(y.numpy().clip(0, 255), palette), colorize(pred, palette)]
        paths.append(os.path.join(out_dir, f"{i:03d}_{tag}.png"))
        label_picture(panels, ["image", "ground truth", title], classes, palette).save(paths[-1])
    return paths


# -----------------------------------------------------------------------------
# the data-protection claim (Sec. 1): how well does an attacker holding the bits rebuild x?


def attacked_system(cfg):
    """The decoder (jd or ahuja) of the checkpoint whose edge an inversion model attacks."""
    try:
        return read_checkpoint(cfg["edge_from"])["args"]["decoder"]
    except (ValueError, FileNotFoundError, KeyError, TypeError):
        return "unknown"


@torch.no_grad()
def codec_image_quality(dataset, codec, qualities=None):
    """PSNR and SSIM of each val image coded and decoded by an image codec, bpp from the bytes
    sent, at each quality: what anyone who intercepts an image code sees."""
    rows = []
    for q in qualities or IMAGE_CODECS[codec][2]:
        bits = pixels = score_psnr = score_ssim = 0.0
        for x, _ in torch.utils.data.DataLoader(dataset, batch_size=8):
            decoded, n_bytes = code_images(x, codec, q)
            x_hat, x01 = as_shown(decoded), as_shown(x)
            score_psnr += psnr(x_hat, x01).sum().item()
            score_ssim += ssim(x_hat, x01).sum().item()
            bits, pixels = bits + 8 * n_bytes, pixels + x.shape[0] * x.shape[-2] * x.shape[-1]
        rows.append({"system": codec, "quality": q, "bpp_real": bits / pixels,
                     "psnr": score_psnr / len(dataset), "ssim": score_ssim / len(dataset)})
    return rows


@torch.no_grad()
def mask_painting(dataset):
    """What the mask alone gives away: each pixel painted with its class's mean colour (over
    the set; ignored pixels with the mean of all), from the ground-truth masks. Returns the
    row of its PSNR and SSIM and the painting of image 0. An attack that does no better than
    this recovers nothing beyond the mask, which the cloud is meant to have."""
    images = [(to_unit(x[None])[0], y) for x, y in (dataset[i] for i in range(len(dataset)))]
    S = 256
    sums, counts = torch.zeros(S, 3, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)
    for x, y in images:
        sums.index_add_(0, y.flatten(), x.flatten(1).T.double())
        counts += torch.bincount(y.flatten(), minlength=S).double()
    colours = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], sums.sum(0) / counts.sum()).float()
    paint = [colours[y].permute(2, 0, 1)[None] for _, y in images]
    score_psnr = sum(psnr(p, x[None]).item() for p, (x, _) in zip(paint, images))
    score_ssim = sum(ssim(p, x[None]).item() for p, (x, _) in zip(paint, images))
    return {"checkpoint": None, "system": "mask only", "alpha": None, "bpp_real": None,
            "psnr": score_psnr / len(images), "ssim": score_ssim / len(images)}, paint[0]


def privacy(ckpts, device, split="val", limit=None, data_root=None, codecs=("jpeg",), qualities=None):
    """Rows (system, alpha, bpp_real, PSNR, SSIM) of the inversion attacks (train.py --decoder
    inversion --edge-from CKPT) on their bitstreams, and of the image codecs decoded normally
    on the same images; and the panels of a picture of the first image."""
    rows, panels, ds = [], [], None
    for path in ckpts:
        model, ckpt = load_checkpoint(path, device)
        cfg = ckpt["args"]
        if cfg["decoder"] != "inversion":
            raise ValueError(f"{path} is a {cfg['decoder']} checkpoint; --privacy takes train.py --decoder "
                             "inversion checkpoints")
        ds, full = val_dataset(cfg, split, limit, data_root)
        m = evaluate(model, ds, device)
        if "refused" in m:
            raise ValueError(f"{path}: its edge codes no bitstream: {m['refused']}")
        system = attacked_system(cfg)
        rows.append({"checkpoint": path, "system": f"attack on {system}", "alpha": cfg["alpha"],
                     "bpp_real": m["bpp_real"], "psnr": m["psnr"], "ssim": m["ssim"]})
        x = ds[0][0][None].to(device)
        strings = model.compress(x)
        x_hat = model.decompress(strings)
        panels.append((to_unit(x_hat), f"attack, {system} bits", 8 * len(strings[0]) / x[0, 0].numel()))
        print(f"{path}: attack on {system}'s bits (alpha {cfg['alpha']}): {m['bpp_real']:.4f} bpp, "
              f"{quality(m)}")
    row, painting = mask_painting(ds)
    rows.append(row)
    print(f"  the ground-truth mask painted in class mean colours: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}")
    for codec in codecs:
        for r in codec_image_quality(ds, codec, qualities):
            rows.append({"checkpoint": None, "alpha": None, **r})
            print(f"  {IMAGE_CODECS[codec][0]} q={r['quality']}: {r['bpp_real']:.4f} bpp, "
                  f"PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}")
    # the picture: the original, each attack, and each codec at the rate nearest to each attack's
    x = ds[0][0][None]
    for codec in codecs:
        near = {min((r for r in rows if r["system"] == codec), key=lambda r: abs(math.log(r["bpp_real"] / b)))["quality"]
                for _, _, b in panels[: len(ckpts)]}
        for q in sorted(near):
            decoded, n_bytes = code_images(x, codec, q)
            panels.append((to_unit(decoded), f"{IMAGE_CODECS[codec][0].split(' ')[0]} q={q}", 8 * n_bytes / x[0, 0].numel()))
    x01 = as_shown(x)
    panels.insert(len(ckpts), (painting, "mask only", None))
    images = [(x01, "original", None)] + [(torch.round(255 * p.cpu()) / 255, t, b) for p, t, b in panels]
    titles = [t if k == 0 else f"{t}: {'' if b is None else f'{b:.3f} bpp, '}{psnr(p, x01).item():.1f} dB"
              for k, (p, t, b) in enumerate(images)]
    pictures = [(p[0].permute(1, 2, 0) * 255).round().byte().numpy() for p, _, _ in images]
    strips = [label_picture(pictures[k:k + 4], titles[k:k + 4]) for k in range(0, len(pictures), 4)]
    grid = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), "white")
    for k, strip in enumerate(strips):  # rows of four panels
        grid.paste(strip, (0, sum(s.height for s in strips[:k])))
    return rows, grid


def print_privacy(rows):
    """Each attack beside the codecs' points nearest in rate."""
    print("attack on the bits vs an image code decoded normally, at the nearest rate:")
    for r in rows:
        if r["checkpoint"] is None:
            if r["system"] == "mask only":
                print(f"  the mask alone (class mean colours): PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}")
            continue
        line = f"  {r['system']:15s} alpha {r['alpha']}: {r['bpp_real']:.4f} bpp, PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}"
        for codec in dict.fromkeys(c["system"] for c in rows if c["checkpoint"] is None and c["bpp_real"]):
            c = min((c for c in rows if c["system"] == codec), key=lambda c: abs(math.log(c["bpp_real"] / r["bpp_real"])))
            line += f"; {codec} {c['bpp_real']:.4f} bpp: {c['psnr']:.2f} dB, {c['ssim']:.3f}"
        print(line)


# -----------------------------------------------------------------------------
# the cloud benchmark: JD vs Ahuja et al.'s SD + D per image, entropy decoding included


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


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
    """The cloud of JD (deployed: fused, with reparam.speed_up's forwards) and of Ahuja et al.'s
    SD + D at a preset's networks and resolution, random weights: latency per image at batch 1
    and throughput at `batch`, entropy decoding, network and mask tail apart. A latency is the
    median of at least `repeat` runs and of at least `min_seconds` of runs, after a warm-up:
    JD's runs are short, and a median of three moved by 10 % between runs of this command on
    the 2-core machine. Both decode the same bytes (JD's entropy models are copied into the
    Ahuja model), so the networks make the difference."""
    cfg = preset(dataset)
    H, W = size or RESOLUTIONS[dataset][1]
    torch.manual_seed(seed)
    models = {"jd": speed_up(reparameterize(build_model({**cfg, "decoder": "jd"}).eval())),
              "ahuja": build_model({**cfg, "decoder": "ahuja"}).eval()}
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
                    lambda: upsampled_masks(model.cloud_head(decoded["r_hat"], (H, W), upsample=False), (H, W))]

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


# -----------------------------------------------------------------------------
# complexity: parameters and multiply-accumulates


# Paper Table 2 (cloud) and Suppl. Table 4 (edge): (params in M, GMACs). The paper's "FLOPs"
# are multiply-accumulates; its COCO cloud numbers only fit a 1024x2048 input.
# Tables 2, 4 also list Song et al.'s learned image codec (Fig. 1a): "codec_edge", "codec_cloud".
PAPER_COMPLEXITY = {
    "coco": {"edge": (25.14, 103), "jd": (1.66, 10), "ahuja": (16.78, 521),
             "codec_edge": (18.77, 211), "codec_cloud": (67.21, 1386),
             "jsde_edge": (8.31, 28), "jsde_cloud": (43.23, 734)},
    "cityscapes": {"edge": (25.14, 801), "jd": (4.92, 39), "ahuja": (42.44, 1366),
                   "codec_edge": (18.77, 1687), "codec_cloud": (93.30, 2834),
                   "jsde_edge": (8.31, 210), "jsde_cloud": (69.32, 1153)},
}
# (edge input, cloud input) per preset; the paper's COCO cloud numbers only fit 1024x2048
RESOLUTIONS = {"synthetic": ((128, 256), (128, 256)), "coco": ((513, 513), (1024, 2048)),
               "cityscapes": ((1024, 2048), (1024, 2048))}


def count_params(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def count_gmacs(fn, *inputs):
    """GMACs of fn(*inputs); FlopCounterMode counts 2 FLOPs per multiply-accumulate."""
    with FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops() / 2e9


def complexity(dataset, K=None):
    """Params and GMACs of edge, JD (training-time and deployed), Ahuja SD+D and the
    No-Compression head for a paper preset; returns a dict (the --json keys)."""
    cfg = preset(dataset)
    cfg["K"] = cfg["K"] if K is None else K
    (eh, ew), (ch, cw) = RESOLUTIONS[dataset]
    # Fig. 1a with a learned image codec: our stand-in for Song et al.'s is CompressAI's scale
    # hyperprior at its high-rate size (bmshj2018_hyperprior, qualities 6-8: N = 192, M = 320).
    # Edge: g_a, h_a and h_s (sigma codes y), the entropy bottleneck; cloud: h_s, g_s, E, D
    codec = ScaleHyperprior(192, 320).to("meta")  # built on the CPU: GDN computes at init
    jsde = build_model({**cfg, "decoder": "jsde"}).to("meta").eval()  # Fig. 1b: the codec's edge, JSDE, D
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        jd, ahuja, nocomp = (build_model({**cfg, "decoder": d}).eval() for d in ("jd", "ahuja", "none"))
        jd_deployed = reparameterize(jd)  # the branch fusion itself, on shapes only
        N = jd.hyperprior.N
        x = torch.empty(1, 3, eh, ew)
        z = torch.empty(1, jd.E.C, -(-ch // 8), -(-cw // 8))  # cloud-side shapes
        r_hat = torch.empty(1, N, *entropy.latent_size((ch, cw)))
        h_hat = torch.empty(1, N, *entropy.hyper_size((ch, cw)))

        def edge(model):  # the transmitter also runs HD: it needs sigma to code r
            return lambda x: model.hyperprior.HD(model.edge(x)[1])

        def cloud(model):
            return lambda r_hat, h_hat: (model.hyperprior.HD(h_hat),
                                         model.cloud_head(r_hat, (ch, cw)))

        hp = jd.hyperprior  # entropy bottleneck + HD: on both ends, counted in both
        out = {
            "edge_params": count_params(jd.E, jd.SE, hp),
            "edge_gmacs": count_gmacs(edge(jd), x),
            "jd_train_params": count_params(hp, jd.JD),
            "jd_train_gmacs": count_gmacs(cloud(jd), r_hat, h_hat),
            "jd_params": count_params(jd_deployed.hyperprior, jd_deployed.JD),
            "jd_gmacs": count_gmacs(cloud(jd_deployed), r_hat, h_hat),
            "ahuja_params": count_params(ahuja.hyperprior, ahuja.SD, ahuja.D),
            "ahuja_gmacs": count_gmacs(cloud(ahuja), r_hat, h_hat),
            "nocomp_params": count_params(nocomp.D),
            "nocomp_gmacs": count_gmacs(lambda z: nocomp.D(z, (ch, cw)), z),
        }
        y_hat = torch.empty(1, 320, -(-ch // 16), -(-cw // 16))
        z_hat = torch.empty(1, 192, -(-ch // 64), -(-cw // 64))
        y_jsde = torch.empty(1, jsde.SE.g_a[-1].out_channels, *entropy.latent_size((ch, cw)))
        z_jsde = torch.empty(1, jsde.hyperprior.N, *entropy.hyper_size((ch, cw)))
        out.update(jsde_edge_params=count_params(jsde.SE, jsde.hyperprior),
                   jsde_edge_gmacs=count_gmacs(edge(jsde), x),
                   jsde_cloud_params=count_params(jsde.hyperprior, jsde.JSDE, jsde.D),
                   jsde_cloud_gmacs=count_gmacs(cloud(jsde), y_jsde, z_jsde))
        out.update(codec_edge_params=count_params(codec.g_a, codec.h_a, codec.h_s, codec.entropy_bottleneck),
                   codec_edge_gmacs=count_gmacs(lambda x: codec.h_s(codec.h_a(codec.g_a(x))), x),
                   codec_cloud_params=count_params(codec.h_s, codec.g_s, nocomp),
                   codec_cloud_gmacs=count_gmacs(lambda y, z: (codec.h_s(z), nocomp(codec.g_s(y))), y_hat, z_hat))
        if cfg["encoder"] == "resnet50":  # Suppl. Sec. 4: the edge with a ResNet-101 E
            jd101 = build_model({**cfg, "encoder": "resnet101", "decoder": "jd"})
            out.update(edge_r101_params=count_params(jd101.E, jd101.SE, jd101.hyperprior),
                       edge_r101_gmacs=count_gmacs(edge(jd101), x))
    out.update(dataset=dataset, K=cfg["K"], edge_resolution=[eh, ew], cloud_resolution=[ch, cw])
    return out


def print_complexity(c):
    paper = PAPER_COMPLEXITY.get(c["dataset"], {})  # the paper has no numbers for the demo
    print(f"{c['dataset']}: edge input {c['edge_resolution'][0]}x{c['edge_resolution'][1]}, "
          f"cloud input {c['cloud_resolution'][0]}x{c['cloud_resolution'][1]}; "
          f"GMACs = FLOPs/2 of torch.utils.flop_counter")
    print(f"{'network':34s} {'params (M)':>10s} {'paper':>7s} {'GMACs':>9s} {'paper':>7s}")
    rows = [("edge: E + SE (+ HD, EB)", "edge", "edge"),
            *([("edge: E101 + SE (Suppl. Sec. 4)", "edge_r101", None)] if "edge_r101_params" in c else []),
            (f"cloud: JD, training time (K={c['K']})", "jd_train", None),
            ("cloud: JD, deployed (Fig. 3)", "jd", "jd"),
            ("cloud: Ahuja et al. SD + D", "ahuja", "ahuja"),
            ("cloud: No Compression D", "nocomp", None),
            ("edge: learned codec g_a, h_a, h_s", "codec_edge", "codec_edge"),
            ("cloud: codec h_s, g_s + E + D", "codec_cloud", "codec_cloud"),
            ("edge: JSDE's codec g_a, h_a, h_s", "jsde_edge", "jsde_edge"),
            ("cloud: h_s + JSDE + D (Fig. 1b)", "jsde_cloud", "jsde_cloud")]
    for name, key, pkey in rows:
        pp, pg = paper.get(pkey, ("-", "-"))
        print(f"{name:34s} {c[key + '_params'] / 1e6:10.2f} {pp:>7} {c[key + '_gmacs']:9.2f} {pg:>7}")
    (jp, jg), (ap, ag) = paper.get("jd", (0, 0)), paper.get("ahuja", (1, 1))
    pr, gr = (f"{100 * jp / ap:6.2f}%", f"{100 * jg / ag:6.2f}%") if paper else ("-", "-")
    print(f"{'JD (deployed) / (SD + D)':34s} {100 * c['jd_params'] / c['ahuja_params']:9.2f}% "
          f"{pr:>7} {100 * c['jd_gmacs'] / c['ahuja_gmacs']:8.2f}% {gr:>7}")
    print("(learned codec: our stand-in, CompressAI's scale hyperprior N = 192, M = 320; paper: Song et al.; "
          "JSDE: its edge is that codec less g_s, Torfason et al. [43] as trained by Liu et al. [30])")


# -----------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to evaluate
    p.add_argument("--ckpt", default=None, help="a train.py / reparam.py checkpoint")
    p.add_argument("--rd", nargs="+", default=None, metavar="CKPT", help="checkpoints for an RD plot/CSV")
    p.add_argument("--benchmark", choices=["cloud"], default=None, help="time JD vs Ahuja's cloud per image")
    p.add_argument("--privacy", nargs="+", default=None, metavar="CKPT", help="inversion attacks (train.py "
                   "--decoder inversion) vs --image-codecs decoded normally: PSNR, SSIM, bpp; --plot a picture")
    p.add_argument("--complexity", action="store_true", help="print params/GMACs vs the paper's tables")
    # data
    p.add_argument("--split", default="val", help="dataset split")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default 8; the benchmark's throughput batch, default 4)")
    # outputs
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--save-bitstreams", default=None, metavar="DIR", help="run only the edge: one file per image")
    p.add_argument("--from-bitstreams", default=None, metavar="DIR", help="run only the cloud, on those files")
    p.add_argument("--save-vis", default=None, metavar="DIR", help="pictures image | truth | prediction, with a legend")
    p.add_argument("--n-vis", type=int, default=4, help="how many pictures --save-vis writes")
    p.add_argument("--plot", default=None, help="RD plot (PNG) for --rd")
    p.add_argument("--csv", default=None, help="RD table (CSV) for --rd")
    p.add_argument("--image-codecs", default="jpeg", help="conventional pipelines for --rd, comma-separated: "
                   f"{','.join(IMAGE_CODECS)} (hevc needs pip install pillow-heif); default %(default)s")
    p.add_argument("--learned-codec", nargs="+", default=None, metavar="CKPT",
                   help="the project's learned codecs (train.py --decoder codec, one per rate) for `learned`, "
                   "instead of CompressAI's pretrained ones (a download)")
    p.add_argument("--codec-qualities", type=int, nargs="+", default=None,
                   help="qualities for every --image-codecs codec (default: each codec's sweep, IMAGE_CODECS)")
    # complexity and benchmark
    p.add_argument("--dataset", default="cityscapes", choices=DATASETS, help="preset networks (data.PRESETS)")
    p.add_argument("--K", type=int, default=None, help="over-parameterization repetitions (default: preset's)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="benchmark input size")
    p.add_argument("--repeat", type=int, default=3,
                   help="the least number of benchmark runs after one warm-up (and at least 10 s of them)")
    p.add_argument("--bpp", type=float, default=0.2, help="the benchmark's latent rate (default %(default)s: "
                   "inside Fig. 5's 0.02-0.3 bpp)")
    # system
    p.add_argument("--max-image-pixels", type=int, default=entropy.MAX_IMAGE_PIXELS,
                   help="the largest image a bitstream may declare (default %(default)s: 2048x4096)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def write_csv(rows, path, keys):
    with open(path, "w") as f:
        f.write(",".join(keys) + "\n")
        for row in rows:
            f.write(",".join("" if row.get(k) is None else str(row[k]) for k in keys) + "\n")


def main(args):
    out = None
    entropy.MAX_IMAGE_PIXELS = args.max_image_pixels  # as PIL.Image.MAX_IMAGE_PIXELS
    codecs = [c for c in args.image_codecs.split(",") if c]
    if args.learned_codec:
        use_learned_codecs(args.learned_codec)
    if args.rd or args.privacy:
        for codec in codecs:
            image_codec_format(codec)  # an unknown codec or a missing pillow-heif: one line, before any work
    if args.complexity:
        out = complexity(args.dataset, args.K)
        print_complexity(out)
    elif args.benchmark:
        out = benchmark_cloud(args.dataset, args.size, args.batch_size or 4, args.repeat, args.device, args.bpp)
        print_benchmark(out)
    elif args.privacy:
        out, picture = privacy(args.privacy, args.device, args.split, args.limit, args.data_root, codecs,
                               args.codec_qualities)
        print_privacy(out)
        if args.csv:
            write_csv(out, args.csv, ["checkpoint", "system", "alpha", "quality", "bpp_real", "psnr", "ssim"])
        if args.plot:
            picture.save(args.plot)
            print(f"wrote {args.plot}")
    elif args.rd:
        out = rd_points(args.rd, args.device, args.split, args.limit, args.data_root, codecs, args.codec_qualities)
        print_rd_compare(rd_compare(out))
        if args.csv:
            write_csv(out, args.csv, ["checkpoint", "dataset", "system", "finetuned", "method", "alpha", "K", "seed",
                                      "quality", "bpp_real", "bpp_est", "miou"])
        if args.plot:
            plot_rd(out, args.plot, f"{out[0]['dataset']}, {args.split} set")
            print(f"wrote {args.plot}")
    elif args.ckpt:
        model, ckpt = load_checkpoint(args.ckpt, args.device)
        speed_up(model)  # a deployed JD runs its faster forwards
        ds, full = val_dataset(ckpt["args"], args.split, args.limit, args.data_root)
        if model.image_out and (args.from_bitstreams or args.save_vis):
            raise ValueError(f"--from-bitstreams and --save-vis score and draw masks; a {model.decoder} model "
                             "rebuilds images (--privacy draws them)")
        if args.save_bitstreams:
            n, total = save_bitstreams(model, ds, args.save_bitstreams, args.device, args.split, args.batch_size or 8)
            out = {"n_images": n, "bytes": total}
            print(f"edge: wrote {n} bitstreams, {total} bytes, to {args.save_bitstreams}")
        elif args.from_bitstreams:
            out = from_bitstreams(model, ds, args.from_bitstreams, args.device, args.split)
            if out["n_images"] == 0:
                raise ValueError(f"no bitstream in {args.from_bitstreams} decoded ({out['n_refused']} refused)")
            print(f"cloud: {out['n_images']} bitstreams decoded, {out['n_refused']} refused; "
                  f"mIoU {out['miou']:.4f}, bpp (file bytes) {out['bpp_real']:.4f}")
        else:
            out = evaluate(model, ds, args.device, args.batch_size or 8)
            if not model.image_out:
                print(f"per-class IoU ({out['n_images']} {args.split} images; nan: class neither in the labels "
                      f"nor predicted)")
                for name, v in zip(full.classes, out["iou"]):
                    print(f"  {name:16s} {v:.4f}")
            line = f"{args.split} ({out['n_images']} images): {quality(out)}"
            if "refused" in out:
                line += f" (eval forward); no bitstream: {out['refused']}"
            elif out["bpp_real"] is not None:
                out["bpp_ratio"] = out["bpp_real"] / out["bpp_est"]
                line += (f", bpp (real bytes) {out['bpp_real']:.4f}, bpp (likelihoods) {out['bpp_est']:.4f}, "
                         f"ratio {out['bpp_ratio']:.3f}")
            print(line)
        if args.save_vis:
            paths = save_vis(model, ds, full.classes, full.palette, args.save_vis, args.n_vis, args.device)
            print(f"wrote {len(paths)} pictures to {args.save_vis}")
    else:
        get_args_parser().print_help()
    if args.json and out is not None:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, no traceback
        sys.exit(f"error: {e}")
