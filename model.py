"""
Every network of the system (Nazir et al., ECCV 2024, Figs. 1-4 and Supplement Figs. 9-11),
built bottom-up from torch/torchvision layers.

    EDGE (transmitter)                          | channel |  CLOUD (receiver)
                                                |         |
    x -> E -> z -> SE.g_a -> r --Q,AE(sigma)----+-- b_r --+--> AD -> r^ --> JD head -> m
    (B,3,H,W)  (B,C,H/8)     (B,64,H/16)   ^    |         |        ^   (ASPP, conv3,
                        SE.h_a            |    |         |        |    DWUpConv, 1x1)
                          v         sigma=HD(h^)|         |   sigma=HD(h^)
                          h --Q,AE----------+---+-- b_h --+--> AD -> h^
                     (B,64,H/64)                |         |
    Ahuja et al. [1] instead decode r^ -> SD -> z^ (B,C,H/8) -> D (DeepLabv3 head) -> m;
    No Compression is E -> z -> D -> m, with nothing on the channel. The image-codec systems
    code x itself: a learned codec (Fig. 1a) x -> g_a -> y ... y^ -> g_s -> x^ (then E, D in
    the cloud), and Torfason et al.'s JSDE (Fig. 1b) y^ -> JSDE -> D -> m; an attacker's
    Inversion decodes JD's bits r^ -> x^ (the data-protection test).

E = DeepLabv3's dilated ResNet-50 (output stride 8), SE = source encoder (analysis g_a and
hyper-analysis h_a), HD = hyper-decoder, JD = joint source and task decoder (Fig. 3) whose
ASPP sub-blocks are over-parameterized with K branches during training (Fig. 4, Sec. 3.3).
The entropy models and the bitstreams live in entropy.py; branch fusion in reparam.py.

    model = build_model({**preset("cityscapes"), "decoder": "jd"})  # S=19, F=512, K=3 (data.py)
    out = model(x)                  # training: {"logits": (B,S,H,W), "likelihoods": {...}}
    strings = model.compress(x)     # edge: one bytes object per image
    logits = model.decompress(strings)  # cloud: never reconstructs z
"""
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision
from torch.nn.functional import adaptive_avg_pool2d, interpolate, relu

from entropy import HyperpriorCoder

# compressai's import warning is silenced by entropy.py, imported above
from compressai.models import ScaleHyperprior  # noqa: E402  (the learned codec's layers)
from compressai.zoo.pretrained import load_pretrained  # noqa: E402

# -----------------------------------------------------------------------------
# building blocks


def conv_bn(cin, cout, k, dilation=1, groups=1, stride=1):
    """Conv (no bias) + BN: one branch of an ASPP sub-block (Fig. 4)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation, groups,
                                   bias=False), nn.BatchNorm2d(cout))


class SubBlock(nn.Module):
    """One ASPP sub-block: parallel conv+BN branches, summed, then ReLU (Fig. 4).

    dilation=None is a pointwise (1x1) sub-block, else a 3x3 conv with that dilation.
      K = 0      plain Fig. 3 block: one conv+BN (the "without over-parameterization" runs)
      K >= 1     training time: K parallel conv+BN branches; a dilated sub-block also gets one
                 1x1 conv+BN branch (K+1 branches, Fig. 4a; no identity: channels change)
      deployed   inference: one conv with bias, what reparam.py fuses the branches into
    """

    def __init__(self, cin, cout, dilation=None, K=0, deployed=False):
        super().__init__()
        k, d = (1, 1) if dilation is None else (3, dilation)
        if deployed:
            branches = [nn.Conv2d(cin, cout, k, padding=d * (k // 2), dilation=d, bias=True)]
        else:
            branches = [conv_bn(cin, cout, k, d) for _ in range(max(K, 1))]
            if dilation is not None and K >= 1:
                branches.append(conv_bn(cin, cout, 1))
        self.branches = nn.ModuleList(branches)
        self.kernel_size, self.dilation = k, d

    def forward(self, x):
        return relu(sum(branch(x) for branch in self.branches))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling [Chen et al. 2017]: a 1x1 sub-block, three dilated 3x3
    sub-blocks, and image pooling, concatenated (5F channels) and projected to F.

    project_kernel=1 is torchvision's DeepLabv3 (and JD, Fig. 3); 3 is MMSegmentation's
    ASPPHead "bottleneck", which the paper's Cityscapes baselines use."""

    def __init__(self, cin, F, dilations, K=0, deployed=False, project_kernel=1, dropout=0.5):
        super().__init__()
        self.b0 = SubBlock(cin, F, None, K, deployed)
        self.dilated = nn.ModuleList([SubBlock(cin, F, d, K, deployed) for d in dilations])
        self.pool = SubBlock(cin, F, None, K, deployed)  # on the globally pooled input
        self.project = nn.Sequential(*conv_bn(len(dilations) * F + 2 * F, F, project_kernel),
                                     nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x):
        # image pooling: AvgPool to 1x1, conv, then UpSampling(u x v); upsampling a 1x1 map
        # bilinearly is a broadcast. (BatchNorm on a 1x1 map needs batch >= 2 in training.)
        pooled = self.pool(adaptive_avg_pool2d(x, 1)).expand(-1, -1, *x.shape[-2:])
        y = torch.cat([self.b0(x), *[b(x) for b in self.dilated], pooled], dim=1)  # (B, 5F, h, w)
        return self.project(y)  # (B, F, h, w)


def kaiming_init(module):
    """Kaiming initialization (Supplement Table 3) for every conv; BN to identity."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# edge: E, SE; the hyper-decoder HD (edge and cloud)

ENCODERS = {"resnet50": 2048, "resnet101": 2048, "resnet18-l2": 128}  # name -> channels C of z


class E(nn.Sequential):
    """Image encoder, split after its last stage; z has C channels at H/8 (Suppl. Fig. 10/11).

    resnet50     DeepLabv3's ResNet-50 with dilated layer3/layer4 (output stride 8), C = 2048
    resnet101    the same with ResNet-101 (Suppl. Sec. 4, Fig. 12), C = 2048
    resnet18-l2  a light CPU encoder: ResNet-18's stem, layer1 and layer2 (stride 8), C = 128
    Module names are torchvision's, so its ResNet state dicts load (fc dropped)."""

    def __init__(self, arch="resnet50"):
        if arch in ("resnet50", "resnet101"):
            net = getattr(torchvision.models, arch)(weights=None, replace_stride_with_dilation=[False, True, True])
            names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        elif arch == "resnet18-l2":
            net = torchvision.models.resnet18(weights=None)
            names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
        else:
            raise ValueError(f"unknown encoder {arch!r}; choose from {sorted(ENCODERS)}")
        super().__init__(OrderedDict((n, getattr(net, n)) for n in names))
        self.C = ENCODERS[arch]


class SE(nn.Module):
    """Source encoder (Fig. 2, after Ahuja et al.'s bottleneck): z -> r, r -> h.

    g_a: DWConv(3x3, C, G=C, stride 2) + BN + ReLU, Conv(1x1, N) + BN. No ReLU on r: the
    entropy model is a zero-mean Gaussian, which a non-negative r would half waste.
    h_a: as in Balle's scale hyperprior, on |r| (the scales do not depend on the sign)."""

    def __init__(self, C, N=64):
        super().__init__()
        self.g_a = nn.Sequential(*conv_bn(C, C, 3, groups=C, stride=2), nn.ReLU(),
                                 *conv_bn(C, N, 1))
        self.h_a = nn.Sequential(nn.Conv2d(N, N, 3, 1, 1), nn.ReLU(),
                                 nn.Conv2d(N, N, 5, 2, 2), nn.ReLU(),
                                 nn.Conv2d(N, N, 5, 2, 2))

    def forward(self, z):
        r = self.g_a(z)  # (B, N, H/16, W/16)
        h = self.h_a(torch.abs(r))  # (B, N, H/64, W/64)
        return r, h


def HD(N=64):
    """Hyper-decoder: h^ (H/64) -> sigma (4x h's size, cropped to r's by the coder).
    No ReLU on sigma: the GaussianConditional bounds it below at 0.11 with a gradient that can
    still raise it, where a ReLU would leave a unit stuck at 0. (Measured on the synthetic data
    at alpha = 0.3, 16 val images: r cost 0.075 bpp with a final ReLU, 0.044 without.)"""
    return nn.Sequential(nn.ConvTranspose2d(N, N, 5, 2, 2, output_padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(N, N, 5, 2, 2, output_padding=1), nn.ReLU(),
                         nn.Conv2d(N, N, 3, 1, 1))


# -----------------------------------------------------------------------------
# cloud: JD (ours), SD + D (Ahuja et al.), D alone (No Compression)


def crop_to_z(y, image_size):
    """Crop a 2x-upsampled H/16 map to z's H/8 grid (ceil(H/8) x ceil(W/8))."""
    return y[..., : -(-image_size[0] // 8), : -(-image_size[1] // 8)]


class JD(nn.Module):
    """Joint source and task decoder, Fig. 3: r^ -> ASPP (over-parameterized with K in
    training, Fig. 4) -> Conv(3x3, F) -> DWUpConv(3x3, F, G=64, stride 2) -> Conv(1x1, S)
    -> bilinear to H x W. No z^ is reconstructed. (HD and the entropy decoders, also part
    of the cloud, are in the model's hyperprior coder.)"""

    def __init__(self, S, F=256, K=1, N=64, dilations=(5, 10, 15), deployed=False):
        super().__init__()
        if F % 64:
            raise ValueError(f"F={F} must be a multiple of DWUpConv's 64 groups")
        self.aspp = ASPP(N, F, dilations, K, deployed)
        self.conv3 = nn.Sequential(*conv_bn(F, F, 3), nn.ReLU())
        self.up = nn.ConvTranspose2d(F, F, 3, 2, 1, output_padding=1, groups=64)  # DWUpConv
        self.classifier = nn.Conv2d(F, S, 1)

    def forward(self, r_hat, image_size, upsample=True):
        y = self.conv3(self.aspp(r_hat))  # (B, F, H/16, W/16)
        y = crop_to_z(self.up(y), image_size)  # (B, F, H/8, W/8)
        y = self.classifier(y)  # (B, S, H/8, W/8)
        return interpolate(y, image_size, mode="bilinear", align_corners=False) if upsample else y


class SD(nn.Module):
    """Ahuja et al.'s source decoder g_s (Suppl. Fig. 9): r^ -> z^ (C channels at H/8).
    UpConv(1x1, C) + BN + ReLU, DWUpConv(3x3, C, G=C, stride 2) + BN + ReLU."""

    def __init__(self, C, N=64):
        super().__init__()
        self.g_s = nn.Sequential(nn.ConvTranspose2d(N, C, 1, bias=False), nn.BatchNorm2d(C),
                                 nn.ReLU(),
                                 nn.ConvTranspose2d(C, C, 3, 2, 1, output_padding=1, groups=C,
                                                    bias=False), nn.BatchNorm2d(C), nn.ReLU())

    def forward(self, r_hat, image_size):
        return crop_to_z(self.g_s(r_hat), image_size)  # z^ (B, C, H/8, W/8)


class D(nn.Module):
    """DeepLabv3 task decoder on z (or z^) [Chen et al. 2017], dilations 12/24/36.

    head="torchvision": torchvision's DeepLabHead (1x1 projection, Dropout 0.5, 3x3 conv,
                        classifier), the COCO baselines'.
    head="mmseg":       MMSegmentation's ASPPHead (3x3 "bottleneck" projection, Dropout 0.1,
                        classifier), the Cityscapes baselines'."""

    def __init__(self, C, S, F=256, head="torchvision", dilations=(12, 24, 36)):
        super().__init__()
        if head not in ("torchvision", "mmseg"):
            raise ValueError(f"unknown head {head!r}; choose torchvision or mmseg")
        mm = head == "mmseg"
        self.aspp = ASPP(C, F, dilations, project_kernel=3 if mm else 1, dropout=0.1 if mm else 0.5)
        self.conv3 = nn.Identity() if mm else nn.Sequential(*conv_bn(F, F, 3), nn.ReLU())
        self.classifier = nn.Conv2d(F, S, 1)

    def forward(self, z, image_size, upsample=True):
        y = self.classifier(self.conv3(self.aspp(z)))  # (B, S, H/8, W/8)
        return interpolate(y, image_size, mode="bilinear", align_corners=False) if upsample else y


# -----------------------------------------------------------------------------
# the image-codec systems: the learned codec (Fig. 1a), JSDE (Fig. 1b); and the attacker


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


# -----------------------------------------------------------------------------
# the whole system

class DistributedSegmenter(nn.Module):
    """Edge and cloud for one decoder type:

      decoder="jd"         ours, Fig. 1d: bitstreams of E's features -> JD -> m
      decoder="ahuja"      Ahuja et al., Fig. 1c: the same bitstreams -> SD -> z^ -> D -> m
      decoder="none"       No Compression DeepLabv3: z -> D -> m (nothing to code)
      decoder="jsde"       Torfason et al., Fig. 1b: an image codec's bitstreams -> JSDE -> D -> m
      decoder="codec"      the learned image codec of Fig. 1a: image bitstreams -> g_s -> x^
      decoder="inversion"  an attacker: JD's or Ahuja's bitstreams -> SD + synthesis -> x^

    forward(x) is the training path (noisy latents, likelihoods for Eq. (1)); compress(x)
    and decompress(strings) are the deployed edge and cloud, through real bitstreams. The
    image-output decoders (codec, inversion) give "x_hat" (normalized as x) for "logits"."""

    def __init__(self, decoder="jd", S=21, F=256, K=1, encoder="resnet50", N=64,
                 dilations=(5, 10, 15), head="torchvision", deployed=False, codec_N=192, codec_M=320):
        super().__init__()
        self.decoder = decoder
        if decoder in ("jsde", "codec"):  # the edge is an image codec's: no E
            self.SE = CodecSE(codec_N, codec_M)
            self.hyperprior = HyperpriorCoder(codec_HD(codec_N, codec_M), codec_N, codec_M)
            if decoder == "jsde":
                self.JSDE = JSDE(codec_M, encoder)
                self.D = D(self.JSDE.C, S, F, head)
            else:
                self.g_s = ImageSynthesis(codec_N, codec_M)
        elif decoder in ("jd", "ahuja", "none", "inversion"):
            self.E = E(encoder)
            C = self.E.C
            if decoder == "none":
                self.D = D(C, S, F, head)
            else:
                self.SE = SE(C, N)
                self.hyperprior = HyperpriorCoder(HD(N), N)
            if decoder == "jd":
                self.JD = JD(S, F, K, N, dilations, deployed)
            elif decoder == "ahuja":
                self.SD = SD(C, N)
                self.D = D(C, S, F, head)
            elif decoder == "inversion":
                self.inversion = Inversion(C, N, 64 if C <= 512 else 128)
        else:
            raise ValueError(f"unknown decoder {decoder!r}; choose from {', '.join(DECODERS)}")
        for name, child in self.named_children():
            # E keeps torchvision's (Kaiming) initialization, the codec's layers CompressAI's
            if name not in ("E", "g_s") and not (name == "SE" and decoder in ("jsde", "codec")):
                kaiming_init(child)

    @property
    def image_out(self):
        """Whether the cloud rebuilds an image (x_hat) instead of a mask."""
        return self.decoder in ("codec", "inversion")

    def edge(self, x):
        """The edge's networks: image -> the latents that are entropy coded (r, h) or (y, z)."""
        return self.SE(x) if self.decoder in ("jsde", "codec") else self.SE(self.E(x))

    def cloud_head(self, r_hat, image_size, upsample=True):
        """The cloud's network after entropy decoding: r^ (or y^) -> logits (B, S, H, W), or
        the image x^ (B, 3, H, W) for the image-output decoders. upsample=False: the logits
        at H/8, before the final bilinear upsampling (see upsampled_masks)."""
        if self.decoder == "jd":
            return self.JD(r_hat, image_size, upsample)
        if self.decoder == "jsde":
            return self.D(self.JSDE(r_hat, image_size), image_size, upsample)
        if self.decoder == "codec":
            return self.g_s(r_hat, image_size)
        if self.decoder == "inversion":
            return self.inversion(r_hat, image_size)
        return self.D(self.SD(r_hat, image_size), image_size, upsample)

    def forward(self, x):
        image_size = x.shape[-2:]
        if self.decoder == "none":
            return {"logits": self.D(self.E(x), image_size), "likelihoods": {}}
        r, h = self.edge(x)
        r_hat, likelihoods = self.hyperprior(r, h)  # noise in training, rounding in eval
        out = self.cloud_head(r_hat, image_size)
        return {"x_hat" if self.image_out else "logits": out, "likelihoods": likelihoods}

    @torch.no_grad()
    def compress(self, x):
        """Edge: images (B, 3, H, W) -> B self-describing byte strings (entropy.py)."""
        if self.decoder == "none":
            raise ValueError("the No Compression model sends no bitstream")
        r, h = self.edge(x)
        return self.hyperprior.compress(r, h, tuple(x.shape[-2:]))

    @torch.no_grad()
    def decompress(self, strings):
        """Cloud: byte strings of images of one size -> logits (B, S, H, W) (or x^)."""
        if self.decoder == "none":
            raise ValueError("the No Compression model sends no bitstream")
        r_hat, image_size = self.hyperprior.decompress(strings)  # refuses any bad string
        return self.cloud_head(r_hat, image_size)

    @torch.no_grad()
    def segment(self, strings):
        """The deployed cloud, bytes to masks: byte strings of images of one size -> m (B, H, W),
        the masks of decompress's logits (upsampled_masks: the same integers, faster)."""
        if self.decoder == "none" or self.image_out:
            raise ValueError(f"a {self.decoder!r} model's cloud makes no mask from bitstreams")
        r_hat, image_size = self.hyperprior.decompress(strings)
        return upsampled_masks(self.cloud_head(r_hat, image_size, upsample=False), image_size)


DECODERS = ("jd", "ahuja", "none", "jsde", "codec", "inversion")


def masks(logits):
    """The segmentation mask m (B, H, W): per pixel, the class of the largest logit of
    (B, S, H, W), the first one where several are equal: argmax(1). On the CPU, where argmax
    and max(1).indices reduce over the strided class dimension slowly, in fast steps with the
    same integers: the maximum value (amax), which classes reach it (a byte each), and the
    first of them, c, as S minus the largest S - c among them (a byte product and amax).
    1024x2048, 19 classes, 2 threads, strips of 64 rows: 31-38 ms, max(1).indices 79-83, argmax 450."""
    S = logits.shape[1]
    if logits.device.type != "cpu" or S > 255:
        return logits.max(1).indices
    at_max = torch.ge(logits, logits.amax(1, keepdim=True)).view(torch.uint8)  # 1 where y_c is the max
    S_minus_c = torch.arange(S, 0, -1, dtype=torch.uint8).reshape(S, *[1] * (logits.dim() - 2))
    m = S - at_max.mul_(S_minus_c).amax(1).long()
    return m if (m < S).all() else logits.max(1).indices  # S: a NaN, equal to nothing; as max() has it


def upsampled_masks(y, image_size, rows=8):
    """masks(interpolate(y, image_size, bilinear)) for logits y (B, S, h, w) at H/8: the same
    integers. On the CPU with H = 8h, in strips of `rows` rows of y, so that each strip's 8·rows
    upsampled rows are reduced to classes while they are still in the cache (1024x2048, 19
    classes, 2 threads: 101-111 vs 158-194 ms). Each strip takes one more row of y above and
    below: output row i's source row (i + 1/2)/8 - 1/2 is exact in float, so within the strip
    every kept row blends the same rows with the same weights as in the whole image. Otherwise
    one call."""
    H, W = image_size
    h = y.shape[-2]
    if y.device.type != "cpu" or H != 8 * h:
        return masks(interpolate(y, image_size, mode="bilinear", align_corners=False))
    m = torch.empty(y.shape[0], H, W, dtype=torch.long)
    for i in range(0, h, rows):
        a, b, e = max(i - 1, 0), min(i + rows + 1, h), min(i + rows, h)  # y rows a..b-1 make rows i..e-1
        strip = interpolate(y[..., a:b, :], (8 * (b - a), W), mode="bilinear", align_corners=False)
        m[:, 8 * i: 8 * e] = masks(strip[..., 8 * (i - a): 8 * (e - a), :])
    return m


# -----------------------------------------------------------------------------
# checkpoints: the model is rebuilt from the settings saved beside its weights

MODEL_KEYS = ("decoder", "num_classes", "F", "K", "encoder", "dilations", "head", "deployed", "codec_N", "codec_M")


def build_model(cfg):
    """A DistributedSegmenter from a train.py config dict (vars(args))."""
    return DistributedSegmenter(cfg["decoder"], cfg["num_classes"], cfg["F"], cfg["K"],
                                cfg["encoder"], dilations=tuple(cfg["dilations"]),
                                head=cfg["head"], deployed=cfg.get("deployed", False),
                                codec_N=cfg.get("codec_N", 192), codec_M=cfg.get("codec_M", 320))


# E's pretrained weights through torchvision's weights API: (source, encoder) -> weights
PRETRAINED = {
    ("imagenet", "resnet50"): torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    ("imagenet", "resnet101"): torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
    # DeepLabv3 trained on COCO reduced to the 21 VOC classes: the paper's COCO No Compression
    ("deeplabv3-coco", "resnet50"): torchvision.models.segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
    ("deeplabv3-coco", "resnet101"): torchvision.models.segmentation.DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1,
}


def pretrained_file(source, encoder):
    """The file of torchvision's weights `source` ("imagenet", "deeplabv3-coco") for `encoder`
    in the torch hub cache ($TORCH_HOME/hub/checkpoints/), downloaded once as torchvision
    does; a file already there loads with no network. ValueError if it cannot be had."""
    weights = PRETRAINED.get((source, encoder))
    if weights is None:
        have = sorted({e for s, e in PRETRAINED if s == source})
        raise ValueError(f"--encoder-weights {source} exists for the encoders {', '.join(have)}, not {encoder}")
    return hub_file(weights.url)


def hub_file(url):
    """The file of `url` in the torch hub cache ($TORCH_HOME/hub/checkpoints/), downloaded once
    as torchvision and CompressAI do; a file already there is used with no network. Its name
    ends in the first hex digits of its SHA-256, checked on download. ValueError if it cannot
    be had."""
    name = os.path.basename(url)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, path, hash_prefix=name.rsplit("-", 1)[1].split(".")[0])
        except Exception as e:  # offline, refused, cut short: the user needs the same three facts
            raise ValueError(f"{name} is not in the torch hub cache and could not be downloaded "
                             f"({type(e).__name__}). Download {url} and put it at {path}") from None
    return path


def load_encoder_weights(encoder, path):
    """Load a state dict into E: a torchvision ResNet (e.g. the ImageNet weights; fc is not
    used), a torchvision DeepLabv3 checkpoint (its "backbone." tensors) or a train.py
    checkpoint (its "E." tensors, e.g. of a No Compression model). Raises ValueError if E's
    tensors are missing or shaped otherwise; returns the keys of the file that E does not use."""
    sd = read_weights(path)
    if isinstance(sd.get("model"), dict):  # a training checkpoint that wraps its state dict
        sd = sd["model"]
    for prefix in ("backbone.", "E."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    ours = encoder.state_dict()
    missing = [k for k in ours if k not in sd]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of E's {len(ours)} tensors, e.g. {missing[:3]}: "
                         "is it a torchvision ResNet / DeepLabv3 state dict?")
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items() if sd[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{path} has tensors shaped otherwise than E's (another --encoder?): {wrong[:3]}")
    encoder.load_state_dict({k: sd[k] for k in ours})
    return [k for k in sd if k not in ours]


# torchvision's DeepLabHead (Sequential: ASPP, 3x3 conv, BN, ReLU, 1x1 classifier) -> our D
DEEPLAB_HEAD = {"classifier.0.convs.0.": "aspp.b0.branches.0.", "classifier.0.convs.4.1.": "aspp.pool.branches.0.0.",
                "classifier.0.convs.4.2.": "aspp.pool.branches.0.1.", "classifier.0.project.": "aspp.project.",
                "classifier.1.": "conv3.0.", "classifier.2.": "conv3.1.", "classifier.4.": "classifier.",
                **{f"classifier.0.convs.{i}.": f"aspp.dilated.{i - 1}.branches.0." for i in (1, 2, 3)}}


def load_deeplab_head(D, path):
    """Load into D the head of a torchvision DeepLabv3 file (its aux classifier dropped) or of
    a train.py checkpoint with a D (a No Compression model, e.g. to fine-tune it on decoded
    images). With E from the same file, the model is that file's. Returns False, loading
    nothing, if the file has no head (e.g. a plain ResNet)."""
    sd, ours = read_weights(path), {}
    if isinstance(sd.get("model"), dict):  # a training checkpoint that wraps its state dict
        sd = sd["model"]
    for k, v in sd.items():
        if k.startswith("D."):
            ours[k[2:]] = v
        prefix = next((p for p in DEEPLAB_HEAD if k.startswith(p)), None)
        if prefix:
            ours[DEEPLAB_HEAD[prefix] + k[len(prefix):]] = v
    if not ours:
        return False
    try:
        D.load_state_dict(ours)
    except RuntimeError as e:
        raise ValueError(f"{path}: its DeepLabv3 head does not fit D (another --F, --head or class count?): "
                         f"{first_mismatch(e)}") from None
    return True


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


def save_checkpoint(obj, path):
    """torch.save to a temporary file, flushed to disk, then renamed over `path`: a crash
    at any moment leaves either the old checkpoint or the new one, never a broken file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def first_mismatch(error):
    """The first detail line of load_state_dict's RuntimeError (a missing key or a shape)."""
    lines = str(error).splitlines()
    return lines[1].strip() if len(lines) > 1 else str(error)


def read_weights(path):
    """torch.load with weights_only=True: tensors and plain containers, never code, whatever
    the torch version's default. ValueError naming the file if it is not such a file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling hostile bytes can fail in many ways; none may run code
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else "empty or cut short"
        raise ValueError(f"{path} is not a readable PyTorch weights file ({type(e).__name__}: {reason})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    return obj


def read_checkpoint(path):
    """A train.py / reparam.py checkpoint dict ("model", "args", ...), loaded safely."""
    ckpt = read_weights(path)
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("args"), dict):
        what = "a plain state dict" if all(isinstance(v, torch.Tensor) for v in ckpt.values()) else "a dict"
        raise ValueError(f"{path} is {what}, not a checkpoint of train.py or reparam.py (it has no "
                         "'model' and 'args'); a state dict for E goes to --encoder-weights")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """(model in eval mode on `device`, checkpoint dict) from a train.py/reparam.py file."""
    ckpt = read_checkpoint(path)
    model = build_model(ckpt["args"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit the model its settings describe "
                         f"({first_mismatch(e)})") from None
    return model.to(device).eval(), ckpt
