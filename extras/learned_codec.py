"""
The project's learned image codec (Fig. 1a's learned pipeline; also the start of Fig. 1b's JSDE):
a scale hyperprior [Balle et al. 2018] with CompressAI's layers, trained on
J = alpha * 255^2 * MSE + (1 - alpha) * bpp (train.py --decoder codec). Its y and z play the
roles of r and h, so the method's coder and container code them (entropy.py):

    x -> g_a -> y --Q,AE(sigma = h_s(z^))--> b_y ... y^ -> g_s -> x^  (then E and D in the cloud)
"""
import torch
import torch.nn as nn

# compressai's import warning is silenced by entropy.py, imported first
from entropy import HyperpriorCoder
from compressai.models import ScaleHyperprior  # noqa: E402
from compressai.zoo.pretrained import load_pretrained  # noqa: E402
from extras.weights import first_mismatch, read_weights  # noqa: E402
from model import DistributedSegmenter, kaiming_init  # noqa: E402


class CodecSE(nn.Module):
    """A learned image codec's edge [Balle et al. 2018]: analysis g_a, x -> y (M channels at
    H/16, four 5x5 stride-2 convs with GDN) and hyper-analysis h_a, |y| -> z (N at H/64).
    CompressAI's ScaleHyperprior(N, M) layers and names, so its weights load; y and z play
    the roles of r and h (the same coder and container code them)."""

    def __init__(self, N=192, M=320):
        super().__init__()
        codec = ScaleHyperprior(N, M)
        self.g_a, self.h_a = codec.g_a, codec.h_a

    def forward(self, x):
        y = self.g_a(x)  # (B, M, H/16, W/16)
        return y, self.h_a(torch.abs(y))  # z (B, N, H/64, W/64)


def codec_HD(N=192, M=320):
    """The codec's hyper-synthesis h_s: z^ -> sigma of y (CompressAI's ScaleHyperprior)."""
    return ScaleHyperprior(N, M).h_s


class ImageSynthesis(nn.Module):
    """The learned codec's synthesis g_s: y^ -> x^ (B, 3, H, W), cropped to the image."""

    def __init__(self, N=192, M=320):
        super().__init__()
        self.g_s = ScaleHyperprior(N, M).g_s

    def forward(self, y_hat, image_size):
        return self.g_s(y_hat)[..., : image_size[0], : image_size[1]]


def build(cfg):
    """The codec as a system: edge g_a, h_a | the coder with h_s | g_s, output the image."""
    N, M = cfg.get("codec_N", 192), cfg.get("codec_M", 320)
    model = DistributedSegmenter("codec", {"SE": CodecSE(N, M)}, HyperpriorCoder(codec_HD(N, M), N, M),
                                 {"g_s": ImageSynthesis(N, M)}, output="x_hat")
    kaiming_init(model.hyperprior)  # g_a, h_a and g_s keep CompressAI's initialization
    return model


def load_codec_weights(model, path):
    """Load an image codec's edge into a jsde (or codec) model: g_a, h_a, h_s and the entropy
    models from a train.py --decoder codec checkpoint, or from a CompressAI ScaleHyperprior
    state dict (e.g. its zoo's bmshj2018-hyperprior files, N = 192, M = 320 at qualities 6-8).
    ValueError if the file has no codec of this size."""
    sd = read_weights(path)
    sd = sd["model"] if isinstance(sd.get("model"), dict) else load_pretrained(sd)  # CompressAI's old key names
    compressai_names = {"g_a.": "SE.g_a.", "h_a.": "SE.h_a.", "h_s.": "hyperprior.HD.",
                        "entropy_bottleneck.": "hyperprior.entropy_bottleneck.",
                        "gaussian_conditional.": "hyperprior.gaussian_conditional."}
    ours = {}
    for k, v in sd.items():
        if k.startswith(("SE.", "hyperprior.")):
            ours[k] = v
        prefix = next((p for p in compressai_names if k.startswith(p)), None)
        if prefix:
            ours[compressai_names[prefix] + k[len(prefix):]] = v
    edge = [k for k in model.state_dict() if k.startswith(("SE.", "hyperprior."))]
    missing = [k for k in edge if k not in ours]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of the codec's {len(edge)} tensors, e.g. {missing[:2]}: "
                         "not a train.py --decoder codec checkpoint or a CompressAI ScaleHyperprior state dict")
    try:
        model.load_state_dict({k: ours[k] for k in edge}, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{path}: its codec has another size (--codec-N, --codec-M?): {first_mismatch(e)}") from None
