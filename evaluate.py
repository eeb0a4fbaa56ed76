"""
Evaluation: mIoU and real bits, the edge/cloud split on files, RD curves (Fig. 5), pictures (Fig. 6).

    python evaluate.py --ckpt out/synthetic/ckpt.pt [--json m.json]   # mIoU, per-class IoU, bpp
    python evaluate.py --ckpt out/synthetic/ckpt.pt --save-bitstreams bits/  # the edge: a file per image
    python evaluate.py --ckpt out/synthetic/ckpt.pt --from-bitstreams bits/  # the cloud: masks from files
    python evaluate.py --ckpt out/synthetic/ckpt.pt --save-vis vis/   # image | ground truth | prediction
    python evaluate.py --rd runs/*/ckpt.pt --plot rd.png --csv rd.csv  # Fig. 5 with JPEG, and the claims
    python evaluate.py --rd runs/*/ckpt.pt --image-codecs jpeg,webp,avif,hevc,learned  # Fig. 1a

Handed to extras/ with their own flags: --complexity, --benchmark cloud, --privacy, --hostile.
"""
import argparse
import importlib
import json
import os
import re
import sys
import time

import torch
import torch.distributed as dist

import entropy
from data import preset, val_dataset
from model import load_checkpoint

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
    per_class = cm.diag() / (cm.sum(0) + cm.sum(1) - cm.diag())  # intersection / union; nan for 0/0
    return per_class.nanmean().item(), per_class.tolist()


class Progress:
    """Long work's progress on stderr: images done and time so far, every `every` s at most."""
    quiet = False  # evaluate.py --quiet

    def __init__(self, what, total, every=10.0):
        self.what, self.total, self.every = what, total, every
        self.t0 = self.last = time.time()

    def __call__(self, done):
        now = time.time()
        if not self.quiet and now - self.last >= self.every:
            print(f"{self.what}: {done}/{self.total} images, {now - self.t0:.0f} s", file=sys.stderr, flush=True)
            self.last = now


def num_classes(model):
    return getattr(model, model.cloud_names[-1]).classifier.out_channels  # JD's or D's classifier


def quality(m):
    """"mIoU 0.7627" for a segmenter's metrics, "PSNR 24.31 dB, SSIM 0.712" for an image decoder's."""
    return f"PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}" if "psnr" in m else f"mIoU {m['miou']:.4f}"


@torch.no_grad()
def evaluate(model, dataset, device, batch_size=8, real_bits=True, rank=0, world_size=1):
    """mIoU over `dataset`, and bits per pixel from the real byte strings (header included) and
    from the likelihoods, Eq. (1). With real_bits the masks come from the cloud decoding the
    edge's bytes, else from the eval forward. Each rank takes every world_size-th image; the
    counts are summed. A cloud that rebuilds the image (extras/) is scored by PSNR and SSIM."""
    model.eval()
    if model.image_out:
        from extras.image_quality import image_scores
    S = 1 if model.image_out else num_classes(model)
    coded = model.hyperprior is not None
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    cm = torch.zeros(S, S, dtype=torch.int64)
    stats = torch.zeros(7, dtype=torch.float64)  # real bits, est. bits, pixels, images, refused, PSNR, SSIM
    refused, progress = None, Progress("evaluate", len(subset))
    for x, y in torch.utils.data.DataLoader(subset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
        out = model(x)  # eval mode: rounded latents, the likelihoods of Eq. (1)
        pred = out[model.output]
        if coded:
            stats[1] += entropy.bits_per_pixel(out["likelihoods"], pixels).item() * pixels
        if coded and real_bits and refused is None:
            try:
                strings = model.compress(x)  # the edge (E runs again: one path, the deployed one)
            except ValueError as e:  # latents the coder cannot take (an untrained or diverged
                refused, stats[4] = str(e), 1  # model): no real bits; masks of the eval forward
            else:
                stats[0] += 8 * sum(len(s) for s in strings)
                pred = model.decompress(strings)  # the cloud, from the bytes alone
        if model.image_out:
            stats[5:7] += image_scores(pred, x)  # summed PSNR and SSIM of the images as shown
        else:
            cm += confusion_matrix(pred.argmax(1), y, S)  # m: the first class of the largest logit
        stats[2:4] += torch.tensor([pixels, x.shape[0]])  # pixels, images
        progress(int(stats[3]))
    if world_size > 1:
        cm, stats = cm.to(device), stats.to(device)
        dist.all_reduce(cm)
        dist.all_reduce(stats)
        cm, stats = cm.cpu(), stats.cpu()
    miou, per_class = iou(cm)
    real = coded and real_bits and stats[4] == 0
    scores = {"psnr": (stats[5] / stats[3]).item(), "ssim": (stats[6] / stats[3]).item()} if model.image_out \
        else {"miou": miou, "iou": per_class}
    return {**scores, "n_images": int(stats[3]),
            "bpp_real": (stats[0] / stats[2]).item() if real else None,
            "bpp_est": (stats[1] / stats[2]).item() if coded else None,
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
def from_bitstreams(model, dataset, in_dir, device, split="val", return_masks=False, fast=False):
    """The cloud alone: decode every file of in_dir and score the mask against the label of
    the image its name points to. A file that is corrupt, foreign, or written by another
    model is reported by name and skipped, never decoded into garbage. fast: the model gets
    the fast forwards of extras/fast_cloud.py and decodes through its segment (the same masks)."""
    from extras.bitstream_guard import max_container_bytes, unpack  # the largest legal file: read no more
    if fast:
        from extras.fast_cloud import segment, speed_up
        speed_up(model)
    else:
        def segment(model, strings):
            return model.decompress(strings).argmax(1)  # m: the first class of the largest logit
    hp = model.eval().hyperprior
    if hp is None:
        raise ValueError("the No Compression model sends no bitstream: --from-bitstreams takes jd or ahuja")
    model_id, cap = hp.model_id(), max_container_bytes(hp.N, hp.M, hp.key is not None)
    S = num_classes(model)
    cm = torch.zeros(S, S, dtype=torch.int64)
    bits = pixels = decoded = 0
    refused, decoded_masks = [], {}
    names = sorted(os.listdir(in_dir))
    progress = Progress("cloud", len(names))
    for k, name in enumerate(names):
        progress(k)
        path = os.path.join(in_dir, name)
        match = re.fullmatch(rf"{split}_(\d+){re.escape(SUFFIX)}", name)
        try:
            if not match or not os.path.isfile(path):
                raise ValueError(f"not a bitstream file of this split ({split}_NNNNN{SUFFIX})")
            i = int(match[1])
            if name != f"{split}_{i:05d}{SUFFIX}":  # one name per image: val_1 is not val_00001
                raise ValueError(f"not the name of image {i}'s file ({split}_{i:05d}{SUFFIX})")
            if i >= len(dataset):
                raise ValueError(f"the {split} split has no image {i}")
            with open(path, "rb") as f:
                data = f.read(cap + 1)
            if len(data) > cap:
                raise ValueError(f"more than {cap} bytes: larger than any bitstream of this model")
            _, y = dataset[i]
            size = unpack(data, model_id, hp.N, hp.M, hp.key)["image_size"]  # every check, no decoding
            if size != tuple(y.shape):
                raise ValueError(f"declares a {size[0]}x{size[1]} image, but image {i} is {y.shape[0]}x{y.shape[1]}")
            pred = segment(model, [data])[0]
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
# rate-distortion curves (Fig. 5)


def rd_points(ckpts, device, split="val", limit=None, data_root=None, codecs=("jpeg",), qualities=None):
    """One row per checkpoint (mIoU, real and estimated bpp), plus Fig. 1a's points for each No
    Compression checkpoint: every codec of `codecs`, or its own if fine-tuned; a .csv: its rows."""
    rows = []
    for path in ckpts:
        if path.endswith(".csv"):  # the rows of an earlier --rd --csv, not evaluated again
            from extras.rd_claims import read_rows
            rows += [r for r in read_rows(path) if r not in rows]  # a row in two CSVs: once
            continue
        model, ckpt = load_checkpoint(path, device)
        cfg = ckpt["args"]
        if model.image_out:
            print(f"{path}: left out, a {cfg['decoder']} model rebuilds images (--learned-codec, --privacy)")
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
               "seed": cfg.get("seed", 0), "reading": ("frozen" if cfg.get("freeze_encoder") else "trained on")
               if cfg.get("nocomp_model") not in (None, "none") else None,  # E's start (train.py --nocomp-model)
               "F": cfg.get("F") if coded else None, "dilations": "-".join(map(str, cfg.get("dilations") or []))
               if cfg["decoder"] == "jd" else None}
        if not tuned:
            rows.append({**row, "method": cfg["decoder"], "bpp_real": m["bpp_real"], "bpp_est": m["bpp_est"],
                         "miou": m["miou"]})
            print(f"{path}: {cfg['decoder']}, mIoU {m['miou']:.4f}, bpp {m['bpp_real']}")
        if cfg["decoder"] == "none":  # Fig. 1a: the images coded, decoded and segmented by this model
            from extras.image_codecs import codec_points
            rows += codec_points(model, ds, device, row, [tuned] if tuned else codecs, bool(tuned), qualities)
    return rows


def plot_rd(rows, path, title="", by=None):
    """mIoU over bpp on a log axis, as Fig. 5; with `by` (some of K, F, dilations: the ablations,
    Figs. 7, 8, Suppl. Fig. 17) a JD curve per value of those settings and seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9.5, 4.5), dpi=100)
    from extras.image_codecs import IMAGE_CODECS
    styles = {"jd": ("o-", "C3", "JD (ours, Fig. 1d)"), "ahuja": ("s-", "C0", "Ahuja et al. SD + D (Fig. 1c)"),
              "jsde": ("D-", "C8", "JSDE, Torfason et al. (Fig. 1b)")}
    if by:  # each value of JD's settings is a method of its own; Ahuja et al. for reference
        rows = [{**r, "method": ", ".join(["JD"] + [f"{b} {r[b]}" for b in by])} if r["method"] == "jd" else r
                for r in rows]
        jds = sorted({r["method"] for r in rows if r["method"].startswith("JD")}, key=lambda m: (len(m), m))  # 64 < 128
        styles = {**{m: ("o-", f"C{k + 1}", m) for k, m in enumerate(jds)}, "ahuja": styles["ahuja"]}
    for codec, colour in zip(IMAGE_CODECS if not by else [], ("C2", "C4", "C5", "C1", "C6")):
        styles[codec] = ("^:", colour, f"{IMAGE_CODECS[codec][0]} + DeepLabv3 (Fig. 1a)")
        styles[codec + "-ft"] = ("^--", colour, f"{IMAGE_CODECS[codec][0]} + DeepLabv3 fine-tuned")
    for method, (marker, colour, label) in styles.items():  # a curve per reading of E's start and seed
        curves = sorted({(r.get("reading") or "", r.get("seed", 0)) for r in rows if r["method"] == method})
        for reading, seed in curves:
            pts = sorted((r["bpp_real"], r["miou"]) for r in rows if r["method"] == method and
                         r.get("seed", 0) == seed and (r.get("reading") or "") == reading)
            more = [s for s in (reading and f"E {reading}", seed and f"seed {seed}") if s]
            ax.plot(*zip(*pts), marker.replace("-", "--") if reading == "trained on" else marker, color=colour, ms=4,
                    alpha=0.45 if seed else 1, mfc="white" if reading == "trained on" else colour,
                    label=", ".join([label.split(" (")[0]] + more) if more else label)
    for r in [r for r in rows if r["method"] == "none"]:
        ax.axhline(r["miou"], color="k", ls=":", label="No Compression")
    ax.set(xscale="log", xlabel="bits per pixel (real bitstreams and files)", ylabel="mIoU", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: no point hidden
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -----------------------------------------------------------------------------
# the command line


def add_common_flags(p):
    """Flags of every command that scores checkpoints on a dataset."""
    p.add_argument("--split", default="val", help="dataset split")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="a train.py / reparam.py checkpoint")
    p.add_argument("--rd", nargs="+", default=None, metavar="CKPT", help="checkpoints (or CSVs of --rd) for an RD plot")
    add_common_flags(p)
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default %(default)s)")
    p.add_argument("--save-bitstreams", default=None, metavar="DIR", help="run only the edge: one file per image")
    p.add_argument("--from-bitstreams", default=None, metavar="DIR", help="run only the cloud, on those files")
    p.add_argument("--fast", action="store_true", help="--from-bitstreams on extras/fast_cloud.py's path")
    p.add_argument("--save-vis", default=None, metavar="DIR", help="image | truth | prediction (X.png: all in one)")
    p.add_argument("--vis-with", nargs="+", default=None, metavar="CKPT", help="--save-vis: these models' masks too")
    p.add_argument("--n-vis", type=int, default=4, help="how many images --save-vis draws")
    p.add_argument("--plot", default=None, help="RD plot (PNG) for --rd")
    p.add_argument("--plot-by", default=None, choices=["K", "F", "dilations"], nargs="+", help="--rd's ablations")
    p.add_argument("--csv", default=None, help="RD table (CSV) for --rd")
    p.add_argument("--max-image-pixels", type=int, default=entropy.MAX_IMAGE_PIXELS, help="the largest image a "
                   "bitstream may declare, in pixels of h^'s 64x64 grid (default %(default)s: 2048x4096)")
    p.add_argument("--key-file", default=None, help="a secret shared by edge and cloud: strings carry its MAC")
    from extras.image_codecs import add_codec_flags  # --image-codecs, --learned-codec, --codec-qualities
    add_codec_flags(p)
    return p


def write_csv(rows, path, keys):
    with open(path, "w") as f:
        f.write(",".join(keys) + "\n")
        for row in rows:
            f.write(",".join("" if row.get(k) is None else str(row[k]) for k in keys) + "\n")


def main(args):
    entropy.MAX_IMAGE_PIXELS = args.max_image_pixels  # as PIL.Image.MAX_IMAGE_PIXELS
    Progress.quiet = args.quiet
    if args.rd:
        from extras import image_codecs, rd_claims as claims
        out = rd_points(args.rd, args.device, args.split, args.limit, args.data_root,
                        image_codecs.use_codec_flags(args), args.codec_qualities)
        claims.print_claims(out, args.plot_by, preset(out[0]["dataset"]))  # Fig. 5's, or the ablations' numbers
        if args.csv:
            write_csv(out, args.csv, ["checkpoint", "dataset", "system", "finetuned", "method", "reading", "alpha", "K",
                                      "F", "dilations", "seed", "quality", "bpp_real", "bpp_est", "miou"])
        if args.plot:
            plot_rd(out, args.plot, f"{out[0]['dataset']}, {args.split} set", args.plot_by)
            print(f"wrote {args.plot}")
        return out
    if not args.ckpt:
        return get_args_parser().print_help()
    model, ckpt = load_checkpoint(args.ckpt, args.device)
    ds, full = val_dataset(ckpt["args"], args.split, args.limit, args.data_root)
    if args.key_file and model.hyperprior:
        from extras.bitstream_guard import read_key
        model.hyperprior.key = read_key(args.key_file)  # keyed strings only (extras/bitstream_guard.py)
    if model.image_out and (args.from_bitstreams or args.save_vis):
        raise ValueError(f"--from-bitstreams and --save-vis score and draw masks; a {model.decoder} model "
                         "rebuilds images (--privacy draws them)")
    if args.save_bitstreams:
        n, total = save_bitstreams(model, ds, args.save_bitstreams, args.device, args.split, args.batch_size)
        out = {"n_images": n, "bytes": total}
        print(f"edge: wrote {n} bitstreams, {total} bytes, to {args.save_bitstreams}")
    elif args.from_bitstreams:
        out = from_bitstreams(model, ds, args.from_bitstreams, args.device, args.split, fast=args.fast)
        if out["n_images"] == 0:
            raise ValueError(f"no bitstream in {args.from_bitstreams} decoded ({out['n_refused']} refused)")
        print(f"cloud: {out['n_images']} bitstreams decoded, {out['n_refused']} refused; "
              f"mIoU {out['miou']:.4f}, bpp (file bytes) {out['bpp_real']:.4f}")
    else:
        out = evaluate(model, ds, args.device, args.batch_size)
        if not model.image_out:
            print(f"per-class IoU ({out['n_images']} {args.split} images; nan: neither labelled nor predicted)")
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
        from extras.pictures import save_vis  # with --vis-with: the other models' predictions beside
        models = [model] + [load_checkpoint(path, args.device)[0] for path in args.vis_with or []]
        print(f"wrote {save_vis(models, ds, full.classes, full.palette, args.save_vis, args.n_vis, args.device)}")
    return out


HANDED = {"--complexity": "extras.complexity", "--benchmark": "extras.benchmark", "--privacy": "extras.privacy",
          "--hostile": "extras.bitstream_guard"}


def run(argv):
    """evaluate.py's command line: a mode of extras/ gets the whole argv, the rest is main's."""
    extra = next((module for flag, module in HANDED.items() if flag in argv), None)
    if extra:
        out, json_path = importlib.import_module(extra).main(argv)
    else:
        args = get_args_parser().parse_args(argv)
        out, json_path = main(args), args.json
    if json_path and out is not None:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    sys.modules["evaluate"] = sys.modules["__main__"]  # extras/ importing evaluate get this module (--quiet)
    try:
        run(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, no traceback
        sys.exit(f"error: {e}")
