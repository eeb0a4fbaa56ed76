"""
The paper's RD claims as numbers, from evaluate.py --rd's rows (printed by it):
- JD against Ahuja et al. at equal real bpp (the other curve of the same seed interpolated on
  log bpp, as on Fig. 5's axis);
- each conventional pipeline (Fig. 1a, plain or fine-tuned) and JSDE (Fig. 1b) against the best
  feature-coding point (JD or Ahuja) that needs no more bits.
"""
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
      positive margin means feature coding is better at that rate."""
    coders = [r for r in rows if r["method"] in ("jd", "ahuja")]
    groups = sorted({(r.get("reading") or "", r.get("seed", 0)) for r in coders})
    out = {"jd_vs_ahuja": [], "feature_vs_codec": {}}
    for reading, seed in groups:  # one curve per method, reading and seed
        curve = {m: sorted((r["bpp_real"], r["miou"]) for r in coders if r["method"] == m and r.get("seed", 0) == seed
                           and (r.get("reading") or "") == reading) for m in ("jd", "ahuja")}
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
                    out["feature_vs_codec"][method].append({"bpp": bpp, "codec": miou, "reading": reading,
                                                            "feature": best,
                                                            "margin": None if best is None else best - miou})
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
            print(f"  {r['bpp']:.4f} bpp: mIoU {r['codec']:.4f}; {reading_label(r['reading'])}: {best}")
