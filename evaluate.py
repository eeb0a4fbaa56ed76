"""
Evaluation of the distributed segmenters.

Complexity (paper Table 2, Suppl. Tables 4 and 5), counted on the meta device, nothing runs:
    python evaluate.py --complexity --dataset cityscapes            # K = 3, 1024x2048
    python evaluate.py --complexity --dataset coco --json coco.json # K = 1, 513x513 / 1024x2048
"""
import argparse
import json

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from model import PAPER_NETWORKS, DistributedSegmenter

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


@torch.no_grad()
def evaluate(model, dataset, device, batch_size=8, real_bits=True, rank=0, world_size=1):
    """mIoU over `dataset`, and bits per pixel: from the real byte strings (the whole
    container, header included) and from the likelihoods, Eq. (1). With real_bits, the
    masks come from the cloud decoding the edge's bytes. Each rank evaluates every
    world_size-th image; the counts are summed across ranks, so none is counted twice."""
    model.eval()
    S = model.JD.classifier.out_channels if model.decoder == "jd" else model.D.classifier.out_channels
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size)
    cm = torch.zeros(S, S, dtype=torch.int64)
    stats = torch.zeros(4, dtype=torch.float64)  # real bits, estimated bits, pixels, images
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if model.decoder == "none":
            logits = model(x)["logits"]
        else:
            r, h = model.SE(model.E(x))  # the edge
            r_hat, likelihoods = model.hyperprior(r, h)
            stats[1] += sum(-torch.log2(p).sum() for p in likelihoods.values()).item()
            if real_bits:
                strings = model.hyperprior.compress(r, h, tuple(x.shape[-2:]))
                stats[0] += 8 * sum(len(s) for s in strings)
                logits = model.decompress(strings)  # the cloud, from bytes only
            else:
                logits = model.cloud_head(r_hat, x.shape[-2:])
        cm += confusion_matrix(logits.argmax(1), y, S)
        stats[2] += x.shape[0] * x.shape[-2] * x.shape[-1]
        stats[3] += x.shape[0]
    if world_size > 1:
        cm, stats = cm.to(device), stats.to(device)
        dist.all_reduce(cm)
        dist.all_reduce(stats)
        cm, stats = cm.cpu(), stats.cpu()
    miou, per_class = iou(cm)
    compressed = model.decoder != "none"
    return {"miou": miou, "iou": per_class, "n_images": int(stats[3]),
            "bpp_real": (stats[0] / stats[2]).item() if compressed and real_bits else None,
            "bpp_est": (stats[1] / stats[2]).item() if compressed else None}

# -----------------------------------------------------------------------------
# complexity: parameters and multiply-accumulates


# Paper Table 2 (cloud) and Suppl. Table 4 (edge): (params in M, GMACs). The paper's "FLOPs"
# are multiply-accumulates; its COCO cloud numbers only fit a 1024x2048 input.
PAPER_COMPLEXITY = {
    "coco": {"edge": (25.14, 103), "jd": (1.66, 10), "ahuja": (16.78, 521)},
    "cityscapes": {"edge": (25.14, 801), "jd": (4.92, 39), "ahuja": (42.44, 1366)},
}
RESOLUTIONS = {"coco": ((513, 513), (1024, 2048)), "cityscapes": ((1024, 2048), (1024, 2048))}


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
    cfg = dict(PAPER_NETWORKS[dataset])
    cfg["K"] = cfg["K"] if K is None else K
    (eh, ew), (ch, cw) = RESOLUTIONS[dataset]
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        jd = DistributedSegmenter("jd", **cfg).eval()
        jd_deployed = DistributedSegmenter("jd", **cfg, deployed=True).eval()
        ahuja = DistributedSegmenter("ahuja", **cfg).eval()
        nocomp = DistributedSegmenter("none", **cfg).eval()
        x = torch.empty(1, 3, eh, ew)
        z = torch.empty(1, jd.E.C, -(-ch // 8), -(-cw // 8))  # cloud-side shapes
        r_hat = torch.empty(1, 64, -(-ch // 16), -(-cw // 16))
        h_hat = torch.empty(1, 64, -(-ch // 64), -(-cw // 64))

        def edge(x):  # the transmitter also runs HD: it needs sigma to code r
            r, h = jd.SE(jd.E(x))
            jd.hyperprior.HD(h)

        def cloud(model):
            return lambda r_hat, h_hat: (model.hyperprior.HD(h_hat),
                                         model.cloud_head(r_hat, (ch, cw)))

        hp = jd.hyperprior  # entropy bottleneck + HD: on both ends, counted in both
        out = {
            "edge_params": count_params(jd.E, jd.SE, hp),
            "edge_gmacs": count_gmacs(edge, x),
            "jd_train_params": count_params(hp, jd.JD),
            "jd_train_gmacs": count_gmacs(cloud(jd), r_hat, h_hat),
            "jd_params": count_params(jd_deployed.hyperprior, jd_deployed.JD),
            "jd_gmacs": count_gmacs(cloud(jd_deployed), r_hat, h_hat),
            "ahuja_params": count_params(ahuja.hyperprior, ahuja.SD, ahuja.D),
            "ahuja_gmacs": count_gmacs(cloud(ahuja), r_hat, h_hat),
            "nocomp_params": count_params(nocomp.D),
            "nocomp_gmacs": count_gmacs(lambda z: nocomp.D(z, (ch, cw)), z),
        }
    out.update(dataset=dataset, K=cfg["K"], edge_resolution=[eh, ew], cloud_resolution=[ch, cw])
    return out


def print_complexity(c):
    paper = PAPER_COMPLEXITY[c["dataset"]]
    print(f"{c['dataset']}: edge input {c['edge_resolution'][0]}x{c['edge_resolution'][1]}, "
          f"cloud input {c['cloud_resolution'][0]}x{c['cloud_resolution'][1]}; "
          f"GMACs = FLOPs/2 of torch.utils.flop_counter")
    print(f"{'network':34s} {'params (M)':>10s} {'paper':>7s} {'GMACs':>9s} {'paper':>7s}")
    rows = [("edge: E + SE (+ HD, EB)", "edge", "edge"),
            (f"cloud: JD, training time (K={c['K']})", "jd_train", None),
            ("cloud: JD, deployed (Fig. 3)", "jd", "jd"),
            ("cloud: Ahuja et al. SD + D", "ahuja", "ahuja"),
            ("cloud: No Compression D", "nocomp", None)]
    for name, key, pkey in rows:
        pp, pg = paper[pkey] if pkey else ("-", "-")
        print(f"{name:34s} {c[key + '_params'] / 1e6:10.2f} {pp:>7} {c[key + '_gmacs']:9.2f} {pg:>7}")
    (jp, jg), (ap, ag) = paper["jd"], paper["ahuja"]
    print(f"{'JD (deployed) / (SD + D)':34s} {100 * c['jd_params'] / c['ahuja_params']:9.2f}% "
          f"{100 * jp / ap:6.2f}% {100 * c['jd_gmacs'] / c['ahuja_gmacs']:8.2f}% {100 * jg / ag:6.2f}%")


# -----------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--complexity", action="store_true", help="print params/GMACs vs the paper's tables")
    p.add_argument("--dataset", default="cityscapes", choices=sorted(PAPER_NETWORKS),
                   help="paper preset for --complexity")
    p.add_argument("--K", type=int, default=None, help="over-parameterization repetitions (default: preset's)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return p


def main(args):
    if args.complexity:
        c = complexity(args.dataset, args.K)
        print_complexity(c)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(c, f, indent=2)
    else:
        get_args_parser().print_help()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
