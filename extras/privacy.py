"""
The data-protection claim (Sec. 1: "only the segmentation masks can be retrieved"), tested as
an attacker would: with the trained checkpoint (to entropy-decode r^), train an image decoder
on a frozen JD or Ahuja et al. edge (train.py --decoder inversion --edge-from CKPT, 255^2 * MSE),
then score its images against what the mask alone gives away and against image codecs at the
same rates (evaluate.py --privacy, which runs main here).

    python evaluate.py --privacy runs_attack/*/ckpt.pt --image-codecs jpeg --plot privacy.png --csv privacy.csv
"""
import argparse
import math

import torch
import torch.nn as nn
from PIL import Image

from data import val_dataset
from entropy import HyperpriorCoder
from evaluate import Progress, add_common_flags, evaluate, quality, write_csv
from extras.image_codecs import IMAGE_CODECS, add_codec_flags, code_images, use_codec_flags
from extras.pictures import label_picture
from extras.image_quality import as_shown, psnr, ssim, to_unit
from extras.weights import read_checkpoint
from model import E, HD, SD, SE, DistributedSegmenter, conv_bn, kaiming_init, load_checkpoint


class Inversion(nn.Module):
    """The attacker's decoder (a privacy test, not part of the paper's systems): r^ -> x^.
    Ahuja et al.'s SD (r^ -> z^, C channels at H/8), then an image synthesis network of three
    ConvTranspose(5x5, stride 2) + BN + ReLU, each followed by a 3x3 conv + BN + ReLU
    (C -> 2 W -> W -> W / 2 channels, at H/4, H/2, H), and a 3x3 conv to the 3 colour
    channels. W = 64 on the demo (0.9 M parameters in the synthesis: more than the demo
    codec's g_s, 0.38 M), W = 128 for C = 2048."""

    def __init__(self, C, N=64, W=64):
        super().__init__()
        self.SD = SD(C, N)
        layers, cin = [], C
        for w in (2 * W, W, W // 2):
            layers += [nn.ConvTranspose2d(cin, w, 5, 2, 2, output_padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(), *conv_bn(w, w, 3), nn.ReLU()]
            cin = w
        self.synthesis = nn.Sequential(*layers, nn.Conv2d(cin, 3, 3, 1, 1))

    def forward(self, r_hat, image_size):
        x_hat = self.synthesis(self.SD(r_hat, image_size))  # (B, 3, 8 ceil(H/8), 8 ceil(W/8))
        return x_hat[..., : image_size[0], : image_size[1]]


def build(cfg, N=64):
    """The attacker as a system: the attacked edge E, SE | its coder | Inversion, output the image."""
    encoder = E(cfg["encoder"])
    C = encoder.C
    model = DistributedSegmenter("inversion", {"E": encoder, "SE": SE(C, N)}, HyperpriorCoder(HD(N), N),
                                 {"inversion": Inversion(C, N, 64 if C <= 512 else 128)}, output="x_hat")
    for child in (model.SE, model.hyperprior, model.inversion):
        kaiming_init(child)  # the edge is then loaded from the attacked checkpoint (--edge-from)
    return model


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
        for q in sorted({nearest(rows, codec, b)["quality"] for _, _, b in panels[: len(ckpts)]}):
            decoded, n_bytes = code_images(x, codec, q)
            name = IMAGE_CODECS[codec][0].split(" ")[0]
            panels.append((to_unit(decoded), f"{name} q={q}", 8 * n_bytes / x[0, 0].numel()))
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


def nearest(rows, codec, bpp):
    """The row of `codec` nearest in rate to `bpp` (on a log scale)."""
    return min((r for r in rows if r["system"] == codec), key=lambda r: abs(math.log(r["bpp_real"] / bpp)))


def print_privacy(rows):
    """Each attack beside the codecs' points nearest in rate."""
    print("attack on the bits vs an image code decoded normally, at the nearest rate:")
    for r in rows:
        if r["checkpoint"] is None:
            if r["system"] == "mask only":
                print(f"  the mask alone (class mean colours): PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}")
            continue
        line = f"  {r['system']:15s} alpha {r['alpha']}: {r['bpp_real']:.4f} bpp, PSNR {r['psnr']:.2f} dB, " \
            f"SSIM {r['ssim']:.3f}"
        for codec in dict.fromkeys(c["system"] for c in rows if c["checkpoint"] is None and c["bpp_real"]):
            c = nearest(rows, codec, r["bpp_real"])
            line += f"; {codec} {c['bpp_real']:.4f} bpp: {c['psnr']:.2f} dB, {c['ssim']:.3f}"
        print(line)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--privacy", nargs="+", required=True, metavar="CKPT", help="train.py --decoder inversion "
                   "checkpoints, scored against --image-codecs decoded normally: PSNR, SSIM, bpp")
    p.add_argument("--plot", default=None, help="a picture: the original, each attack, the mask, the codecs")
    p.add_argument("--csv", default=None, help="the rows as CSV")
    add_common_flags(p)
    add_codec_flags(p)
    args = p.parse_args(argv)
    Progress.quiet = args.quiet
    codecs = use_codec_flags(args)
    rows, picture = privacy(args.privacy, args.device, args.split, args.limit, args.data_root, codecs,
                            args.codec_qualities)
    print_privacy(rows)
    if args.csv:
        write_csv(rows, args.csv, ["checkpoint", "system", "alpha", "quality", "bpp_real", "psnr", "ssim"])
    if args.plot:
        picture.save(args.plot)
        print(f"wrote {args.plot}")
    return rows, args.json
