"""
The paper's RD claims as numbers, from evaluate.py --rd's rows (printed by it):
- JD against Ahuja et al. at equal real bpp (the other curve of the same seed interpolated on
  log bpp, as on Fig. 5's axis);
- each conventional pipeline (Fig. 1a, plain or fine-tuned) and JSDE (Fig. 1b) against the best
  feature-coding point (JD or Ahuja) that needs no more bits;
- the two readings of E's start: each E-trained-on point against the same system's E-frozen curve;
- with --plot-by, the ablations: JD by a setting against the preset's value, and the seed spread.
"""
import csv
import math

from extras.image_codecs import IMAGE_CODECS


def miou_at(points, bpp):
    """mIoU of an RD curve (sorted (bpp, mIoU) points) at `bpp`, linear in log(bpp) between
    its neighbours as on the log axis of Fig. 5; None outside the curve's rate range."""
    for (b0, m0), (b1, m1) in zip(points, points[1:]):
        if b0 <= bpp <= b1:
            t = 0.0 if b1 == b0 else math.log(bpp / b0) / math.log(b1 / b0)
            return m0 + t * (m1 - m0)
    return points[0][1] if len(points) == 1 and points[0][0] == bpp else None


def read_rows(path):
    """The rows of an --rd --csv file, typed as rd_points makes them (empty cells: None)."""
    types = {"alpha": float, "K": int, "F": int, "seed": int, "quality": int, "bpp_real": float, "bpp_est": float,
             "miou": float, "finetuned": lambda v: v == "True"}
    with open(path, newline="") as f:
        return [{k: None if v == "" else types.get(k, str)(v) for k, v in row.items()} for row in csv.DictReader(f)]


def codec_label(method):
    """"jpeg" -> "JPEG", "hevc-ft" -> "HEVC (x265 intra), fine-tuned"."""
    if method == "jsde":
        return "JSDE (Torfason et al., Fig. 1b)"
    codec, _, ft = method.partition("-")
    return IMAGE_CODECS[codec][0] + (", fine-tuned" if ft else "")


def rd_compare(rows):
    """The RD claims as numbers, from rd_points' rows, for each reading of E's start (rows'
    "reading": "frozen", "trained on", or "" for E from --encoder-weights):
    - each JD point against Ahuja's curve of the same reading and seed at the same real bpp (and
      each Ahuja point against JD's): difference in mIoU, None outside the other curve's rates;
    - each point of each conventional pipeline (codec, plain or fine-tuned) and of JSDE against
      the best feature-coding point (JD or Ahuja) of each reading that needs no more bits: a
      positive margin means feature coding is better at that rate; and against JD's curve of
      that reading (seed 0) at the same rate, interpolated (None outside its rates);
    - each point of JD or Ahuja with E trained on against the same system's E-frozen curve (seed 0)
      at the same real bpp, interpolated (None outside its rates)."""
    coders = [r for r in rows if r["method"] in ("jd", "ahuja")]
    groups = sorted({(r.get("reading") or "", r.get("seed", 0)) for r in coders})
    out = {"jd_vs_ahuja": [], "feature_vs_codec": {}, "trained_vs_frozen": []}
    seed0 = {}  # reading -> {method: its seed-0 curve}
    for reading, seed in groups:  # one curve per method, reading and seed
        curve = {m: sorted((r["bpp_real"], r["miou"]) for r in coders if r["method"] == m and r.get("seed", 0) == seed
                           and (r.get("reading") or "") == reading) for m in ("jd", "ahuja")}
        if seed == 0:
            seed0[reading] = curve
        for m, other in (("jd", "ahuja"), ("ahuja", "jd")):
            for bpp, miou in curve[m]:
                ref = miou_at(curve[other], bpp) if curve[other] else None
                out["jd_vs_ahuja"].append({"at": m, "reading": reading, "seed": seed, "bpp": bpp,
                                           "jd": miou if m == "jd" else ref, "ahuja": miou if m == "ahuja" else ref})
    for method in sorted({r["method"] for r in rows}):
        if method.partition("-")[0] in IMAGE_CODECS or method == "jsde":
            out["feature_vs_codec"][method] = []
            for bpp, miou in sorted((r["bpp_real"], r["miou"]) for r in rows if r["method"] == method):
                for reading in sorted({reading for reading, _ in groups}):
                    best = max((r["miou"] for r in coders if r["bpp_real"] <= bpp
                                and (r.get("reading") or "") == reading), default=None)
                    jd = seed0.get(reading, {}).get("jd")
                    out["feature_vs_codec"][method].append({"bpp": bpp, "codec": miou, "reading": reading,
                                                            "feature": best,
                                                            "margin": None if best is None else best - miou,
                                                            "jd_curve": miou_at(jd, bpp) if jd else None})
    for m in ("jd", "ahuja"):
        frozen = seed0.get("frozen", {}).get(m)
        for r in sorted((r for r in coders if r["method"] == m and r.get("reading") == "trained on"),
                        key=lambda r: (r.get("seed", 0), r["bpp_real"])):
            out["trained_vs_frozen"].append({"method": m, "seed": r.get("seed", 0), "bpp": r["bpp_real"],
                                             "trained_on": r["miou"],
                                             "frozen": miou_at(frozen, r["bpp_real"]) if frozen else None})
    return out


def reading_label(reading):
    return f"E {reading}" if reading else "E from --encoder-weights"


def print_rd_compare(c):
    print("JD vs Ahuja at equal real bpp (the other curve of the same reading and seed interpolated on log bpp):")
    for r in c["jd_vs_ahuja"]:
        at = f"  {reading_label(r['reading'])}, seed {r['seed']}, {r['at']:5s} point at {r['bpp']:.4f} bpp:"
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
            curve = "" if r["jd_curve"] is None else \
                f"; JD's curve there {r['jd_curve']:.4f} ({100 * (r['jd_curve'] - r['codec']):+.1f})"
            print(f"  {r['bpp']:.4f} bpp: mIoU {r['codec']:.4f}; {reading_label(r['reading'])}: {best}{curve}")
    if c["trained_vs_frozen"]:
        print("E trained on vs E frozen at equal real bpp (the same system's frozen curve, seed 0, on log bpp):")
    for r in c["trained_vs_frozen"]:
        at = f"  {r['method']:5s} seed {r['seed']} at {r['bpp']:.4f} bpp: trained on {r['trained_on']:.4f}"
        print(f"{at}, outside the frozen curve's rates" if r["frozen"] is None else
              f"{at}, frozen {r['frozen']:.4f}, {100 * (r['trained_on'] - r['frozen']):+.1f} points")


def print_claims(rows, by=None, cfg=None):
    """What evaluate.py --rd prints: Fig. 5's claims, or with --plot-by `by` the ablation's
    numbers against the preset `cfg`'s value."""
    if by:
        print_ablation_compare(ablation_compare(rows, by, cfg))
    else:
        print_rd_compare(rd_compare(rows))


def ablation_compare(rows, by, cfg):
    """The ablations (Figs. 7, 8, Suppl. Fig. 17) as numbers: JD's curve of each value of the
    settings `by` (e.g. ["K"]) against the curve of the preset `cfg`'s value, per reading and
    seed, at equal real bpp as in rd_compare (each point of one against the other curve
    interpolated, both ways); and the seed spread of each value at each alpha."""
    jd = [r for r in rows if r["method"] == "jd"]
    reference = tuple("-".join(map(str, cfg[b])) if isinstance(cfg[b], (list, tuple)) else cfg[b] for b in by)
    value = {id(r): tuple(r[b] for b in by) for r in jd}
    out = {"by": by, "reference": reference, "vs_reference": [], "seed_spread": []}
    for reading, seed in sorted({(r.get("reading") or "", r.get("seed", 0)) for r in jd}):
        same = [r for r in jd if (r.get("reading") or "") == reading and r.get("seed", 0) == seed]
        curve = {v: sorted((r["bpp_real"], r["miou"]) for r in same if value[id(r)] == v)
                 for v in {value[id(r)] for r in same}}
        ref = curve.get(reference, [])
        for v, points in sorted(curve.items()):
            if v == reference or not ref:
                continue
            for bpp, miou in points:  # this value's points against the reference curve
                out["vs_reference"].append({"value": v, "reading": reading, "seed": seed, "bpp": bpp, "at": "value",
                                            "miou": miou, "reference": miou_at(ref, bpp)})
            for bpp, miou in ref:  # and the reference's points against this value's curve
                out["vs_reference"].append({"value": v, "reading": reading, "seed": seed, "bpp": bpp,
                                            "at": "reference", "miou": miou_at(points, bpp), "reference": miou})
    for v, alpha in sorted({(value[id(r)], r["alpha"]) for r in jd}):
        seeds = sorted((r.get("seed", 0), r["miou"], r["bpp_real"]) for r in jd
                       if value[id(r)] == v and r["alpha"] == alpha)
        if len(seeds) > 1:
            out["seed_spread"].append({"value": v, "alpha": alpha, "seeds": seeds,
                                       "spread": max(m for _, m, _ in seeds) - min(m for _, m, _ in seeds)})
    return out


def print_ablation_compare(c):
    name = lambda v: ", ".join(f"{b} {x}" for b, x in zip(c["by"], v))  # noqa: E731
    print(f"JD by {', '.join(c['by'])} against {name(c['reference'])} at equal real bpp (interpolated on log bpp):")
    for r in c["vs_reference"]:
        at = f"  {name(r['value'])}, {reading_label(r['reading'])}, seed {r['seed']}, {r['at']:9s} point at " \
             f"{r['bpp']:.4f} bpp:"
        print(f"{at} outside the other curve's rates" if r["miou"] is None or r["reference"] is None else
              f"{at} {r['miou']:.4f} vs {r['reference']:.4f}: {100 * (r['miou'] - r['reference']):+.1f} points")
    print("seed spread (mIoU at bpp, per seed):")
    for r in c["seed_spread"]:
        seeds = ", ".join(f"seed {s} {m:.4f} @ {b:.4f}" for s, m, b in r["seeds"])
        print(f"  {name(r['value'])}, alpha {r['alpha']}: {seeds}; spread {100 * r['spread']:.1f} points")
