"""
Tables 2 and 4, counted: parameters and multiply-accumulates of the edge, JD (training time
and deployed), Ahuja et al.'s SD + D, No Compression's D, the learned codec and JSDE, at a
preset's networks and the paper's resolutions (torch.utils.flop_counter on the meta device: no
memory, no arithmetic).

    python evaluate.py --complexity --dataset cityscapes [--K 3] [--json c.json]
    python evaluate.py --complexity --dataset cityscapes --F 64 128 256 512 --K 0 3   # Fig. 7's x-axis
"""
import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

import entropy
from compressai.models import ScaleHyperprior  # noqa: E402
from data import DATASETS, preset  # noqa: E402
from model import build_model  # noqa: E402
from reparam import reparameterize  # noqa: E402

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
               "cityscapes": ((1024, 2048), (1024, 2048)), "camvid": ((360, 480), (360, 480))}


def count_params(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def count_gmacs(fn, *inputs):
    """GMACs of fn(*inputs); FlopCounterMode counts 2 FLOPs per multiply-accumulate."""
    with FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops() / 2e9


def cloud_gmacs(model, r_hat, h_hat, image_size):
    """The cloud's GMACs: HD on h^ (the scales to decode r) and the cloud's modules on r^."""
    return count_gmacs(lambda r, h: (model.hyperprior.HD(h), model.cloud(r, image_size)), r_hat, h_hat)


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

        hp = jd.hyperprior  # entropy bottleneck + HD: on both ends, counted in both
        out = {
            "edge_params": count_params(jd.E, jd.SE, hp),
            "edge_gmacs": count_gmacs(edge(jd), x),
            "jd_train_params": count_params(hp, jd.JD),
            "jd_train_gmacs": cloud_gmacs(jd, r_hat, h_hat, (ch, cw)),
            "jd_params": count_params(jd_deployed.hyperprior, jd_deployed.JD),
            "jd_gmacs": cloud_gmacs(jd_deployed, r_hat, h_hat, (ch, cw)),
            "ahuja_params": count_params(ahuja.hyperprior, ahuja.SD, ahuja.D),
            "ahuja_gmacs": cloud_gmacs(ahuja, r_hat, h_hat, (ch, cw)),
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
                   jsde_cloud_gmacs=cloud_gmacs(jsde, y_jsde, z_jsde, (ch, cw)))
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


def jd_widths(dataset, Fs, Ks):
    """Fig. 7's complexity axis: JD's cloud (hyperprior decoder HD + JD) at each ASPP width F and
    repetitions K, in training and deployed (fused), at the preset's cloud resolution; Ahuja et
    al.'s SD + D at the preset's F for reference. One row per (F, K)."""
    cfg = preset(dataset)
    ch, cw = RESOLUTIONS[dataset][1]
    rows = []
    with torch.device("meta"):
        N = build_model({**cfg, "decoder": "jd"}).hyperprior.N
        r_hat = torch.empty(1, N, *entropy.latent_size((ch, cw)))
        h_hat = torch.empty(1, N, *entropy.hyper_size((ch, cw)))

        def cloud(model):
            return cloud_gmacs(model, r_hat, h_hat, (ch, cw))
        ahuja = build_model({**cfg, "decoder": "ahuja"}).eval()
        ref = {"ahuja_params": count_params(ahuja.hyperprior, ahuja.SD, ahuja.D), "ahuja_gmacs": cloud(ahuja)}
        for F in Fs:
            for K in Ks:
                jd = build_model({**cfg, "decoder": "jd", "F": F, "K": K}).eval()
                deployed = reparameterize(jd)
                rows.append({"dataset": dataset, "F": F, "K": K, "cloud_resolution": [ch, cw],
                             "jd_train_params": count_params(jd.hyperprior, jd.JD), "jd_train_gmacs": cloud(jd),
                             "jd_params": count_params(deployed.hyperprior, deployed.JD),
                             "jd_gmacs": cloud(deployed), **ref})
    return rows


def print_widths(rows):
    r0 = rows[0]
    print(f"{r0['dataset']}: JD's cloud (HD + JD) by ASPP width F and repetitions K at "
          f"{r0['cloud_resolution'][0]}x{r0['cloud_resolution'][1]}; Ahuja et al. SD + D: "
          f"{r0['ahuja_params'] / 1e6:.2f} M params, {r0['ahuja_gmacs']:.1f} GMACs")
    print(f"{'F':>5s} {'K':>3s} {'training M':>11s} {'GMACs':>8s} {'deployed M':>11s} {'GMACs':>8s} "
          f"{'% of SD+D params':>17s} {'GMACs':>7s}")
    for r in rows:
        print(f"{r['F']:5d} {r['K']:3d} {r['jd_train_params'] / 1e6:11.2f} {r['jd_train_gmacs']:8.3f} "
              f"{r['jd_params'] / 1e6:11.2f} {r['jd_gmacs']:8.3f} {100 * r['jd_params'] / r['ahuja_params']:16.2f}% "
              f"{100 * r['jd_gmacs'] / r['ahuja_gmacs']:6.2f}%")


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


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--complexity", action="store_true", required=True)
    p.add_argument("--dataset", default="cityscapes", choices=DATASETS, help="preset networks (data.PRESETS)")
    p.add_argument("--K", type=int, nargs="+", default=None,
                   help="over-parameterization repetitions (default: the preset's); several: JD's table by F and K")
    p.add_argument("--F", type=int, nargs="+", default=None, help="JD's ASPP widths: JD's table by F and K (Fig. 7)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.F or (args.K and len(args.K) > 1):
        cfg = preset(args.dataset)
        rows = jd_widths(args.dataset, args.F or [cfg["F"]], args.K or [cfg["K"]])
        print_widths(rows)
        return rows, args.json
    args.K = args.K[0] if args.K else None
    out = complexity(args.dataset, args.K)
    print_complexity(out)
    return out, args.json
