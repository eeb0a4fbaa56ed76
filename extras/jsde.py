"""
Torfason et al.'s JSDE [43] as Liu et al. train it [30] (Fig. 1b): the cloud decodes an image
codec's bitstream to y^ and runs a ResNet on it, not on a decoded image:

    x -> codec g_a -> y --Q,AE--> b_y ... y^ -> JSDE (stem, ResNet stages) -> z~ -> D -> m

The edge is the learned codec's (extras/learned_codec.py), started from a trained one
(train.py --decoder jsde --codec-weights CKPT) and trained on Eq. (3) with the rest.
"""
import os
from collections import OrderedDict

import torch.nn as nn

from entropy import HyperpriorCoder
from extras.learned_codec import CodecSE, codec_HD, load_codec_weights
from model import D, DistributedSegmenter, E, crop_to_z, kaiming_init


class JSDE(nn.Module):
    """Torfason et al.'s joint source decoder and image encoder [43] as Liu et al. train it
    [30] (Fig. 1b): y^ (M, H/16) -> two ConvTranspose(5x5, stride 2) + BN + ReLU, M -> 128
    -> 64 channels at H/4, in place of ResNet's conv1 and maxpool -> the ResNet stages of E
    (layer1-4 of the dilated ResNet-50, or the demo's layer1-2) -> z~ (C, H/8) for D. The
    image is never reconstructed, but y^ is an image code: anyone with g_s can decode it."""

    def __init__(self, M=320, arch="resnet50"):
        super().__init__()
        self.stem = nn.Sequential(
            nn.ConvTranspose2d(M, 128, 5, 2, 2, output_padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 5, 2, 2, output_padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        resnet = E(arch)  # torchvision's stage names: a ResNet state dict loads into .layers
        self.layers = nn.Sequential(OrderedDict((n, m) for n, m in resnet.named_children() if n.startswith("layer")))
        self.C = resnet.C

    def forward(self, y_hat, image_size):
        return crop_to_z(self.layers(self.stem(y_hat)), image_size)  # (B, C, H/8, W/8)


def build(cfg):
    """JSDE as a system: edge g_a, h_a | the coder with h_s | JSDE, D."""
    N, M = cfg.get("codec_N", 192), cfg.get("codec_M", 320)
    SE, hyperprior = CodecSE(N, M), HyperpriorCoder(codec_HD(N, M), N, M)
    jsde = JSDE(M, cfg["encoder"])
    model = DistributedSegmenter("jsde", {"SE": SE}, hyperprior,
                                 {"JSDE": jsde, "D": D(jsde.C, cfg["num_classes"], cfg["F"], cfg["head"])})
    for child in (model.hyperprior, model.JSDE, model.D):
        kaiming_init(child)  # the codec's g_a and h_a keep CompressAI's initialization
    return model


def start_from_codec(model, args, out_dir):
    """Sec. 4.2: JSDE starts from a trained codec, --codec-weights or out_dir/ckpt.pt if there.
    Returns the line to print."""
    found = os.path.join(out_dir, "ckpt.pt")
    path = args.codec_weights or (found if os.path.isfile(found) else None)
    if path is None:
        return f"the image codec starts from random weights: no --codec-weights, no {found} " \
               "(train one: python train.py --decoder codec)"
    load_codec_weights(model, path)
    return f"the image codec (g_a, h_a, h_s, entropy models) from {path}"
