"""
The conventional pipelines of Fig. 1a: the image is coded by JPEG, WebP, AVIF, HEVC (x265
intra, through the optional pillow-heif) or a learned codec, decoded in the cloud and segmented
there by the No Compression model, plain or fine-tuned on decoded images (train.py
--image-codec). bpp counts every byte of the file sent.

    python evaluate.py --rd runs/*/ckpt.pt --image-codecs jpeg,webp,avif,hevc,learned
"""
import io

import numpy as np
import torch
from PIL import Image

import entropy  # noqa: F401  (first: it silences compressai's import-time warning)
from compressai.models import ScaleHyperprior  # noqa: E402
from compressai.zoo.image import model_urls  # noqa: E402
from compressai.zoo.pretrained import load_pretrained  # noqa: E402
from data import denormalize, normalize  # noqa: E402
from evaluate import Progress, confusion_matrix, iou, num_classes  # noqa: E402
from extras.weights import hub_file, read_weights  # noqa: E402
from model import load_checkpoint  # noqa: E402

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
        progress = Progress(f"{codec} q={q}", len(dataset))
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            progress(pixels // (x.shape[-2] * x.shape[-1]))
            decoded, n_bytes = code_images(x, codec, q)
            bits, pixels = bits + 8 * n_bytes, pixels + x.shape[0] * x.shape[-2] * x.shape[-1]
            cm += confusion_matrix(model(decoded.to(device))["logits"].argmax(1), y.to(device), S)
        rows.append({"method": codec, "quality": q, "bpp_real": bits / pixels, "miou": iou(cm)[0]})
    return rows


def codec_points(model, dataset, device, row, codecs, finetuned, qualities=None):
    """evaluate.py --rd's rows of Fig. 1a for a No Compression checkpoint (its `row`): each
    codec's points, plain, or fine-tuned on that codec's images (train.py --image-codec)."""
    rows = []
    for codec in codecs:
        for r in codec_rd(model, dataset, device, codec, qualities):
            rows.append({**row, **r, "system": codec, "finetuned": finetuned,
                         "method": codec + ("-ft" if finetuned else "")})
            print(f"  {IMAGE_CODECS[codec][0]}{' fine-tuned' if finetuned else ''} q={r['quality']}: "
                  f"mIoU {r['miou']:.4f}, bpp {r['bpp_real']:.4f}")
    return rows


def add_codec_flags(p):
    """The flags of the commands that run the pipelines (evaluate.py --rd, --privacy)."""
    p.add_argument("--image-codecs", default="jpeg", help="conventional pipelines, comma-separated: "
                   f"{','.join(IMAGE_CODECS)} (hevc needs pip install pillow-heif); default %(default)s")
    p.add_argument("--learned-codec", nargs="+", default=None, metavar="CKPT",
                   help="the project's learned codecs (train.py --decoder codec, one per rate) for `learned`, "
                   "instead of CompressAI's pretrained ones (a download)")
    p.add_argument("--codec-qualities", type=int, nargs="+", default=None,
                   help="qualities for every --image-codecs codec (default: each codec's sweep, IMAGE_CODECS)")


def use_codec_flags(args):
    """The codecs those flags ask for, each checked before any work (an unknown codec or a
    missing pillow-heif: one line)."""
    if args.learned_codec:
        use_learned_codecs(args.learned_codec)
    codecs = [c for c in args.image_codecs.split(",") if c]
    for codec in codecs:
        image_codec_format(codec)
    return codecs
