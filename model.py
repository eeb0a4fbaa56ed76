"""
The networks of the system (Nazir et al., ECCV 2024, Figs. 1-4, Supplement Figs. 9-11), built
bottom-up from torch/torchvision layers, and the edge/cloud system made of them.

    EDGE (transmitter)                          | channel |  CLOUD (receiver)
                                                |         |
    x -> E -> z -> SE.g_a -> r --Q,AE(sigma)----+-- b_r --+--> AD -> r^ --> JD -> m
    (B,3,H,W)  (B,C,H/8)     (B,N,H/16)   ^     |         |        ^   (ASPP, conv3,
                        SE.h_a            |     |         |        |    DWUpConv, 1x1)
                          v         sigma=HD(h^)|         |   sigma=HD(h^)
                          h --Q,AE----------+---+-- b_h --+--> AD -> h^
                     (B,N,H/64)                 |         |
    Ahuja et al. [1] decode r^ -> SD -> z^ (B,C,H/8) -> D (DeepLabv3 head) -> m instead;
    No Compression is x -> E -> z -> D -> m, with nothing on the channel.

E = image encoder (dilated ResNet-50, output stride 8), SE = source encoder (g_a, h_a), HD =
hyper-decoder, JD = joint source and task decoder (Fig. 3; K-branch ASPP sub-blocks, Fig. 4).
The coder (Q, AE, AD) is entropy.py's, the fusion of JD's K branches reparam.py's.

    model = build_model({**preset("cityscapes"), "decoder": "jd"})  # S=19, F=512, K=3 (data.py)
    out = model(x)                      # training: {"logits": (B,S,H,W), "likelihoods": {...}}
    strings = model.compress(x)         # edge: one bytes object per image
    logits = model.decompress(strings)  # cloud: never reconstructs z
"""
import importlib
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision
from torch.nn.functional import adaptive_avg_pool2d, interpolate, relu

from entropy import HyperpriorCoder

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
    """Kaiming initialization (Supplement Table 3) for every conv; BN keeps PyTorch's identity start."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
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
    """Hyper-decoder: h^ (H/64) -> sigma (4x h's size, cropped to r's by the coder). No ReLU on
    sigma: the GaussianConditional bounds it below at 0.11 with a gradient that can still raise
    it, where a ReLU would leave a unit stuck at 0 (docs/reconstruction.md)."""
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
    of the cloud, are in the model's hyperprior coder, entropy.py.)"""

    def __init__(self, S, F=256, K=1, N=64, dilations=(5, 10, 15), deployed=False):
        super().__init__()
        if F % 64:
            raise ValueError(f"F={F} must be a multiple of DWUpConv's 64 groups")
        self.aspp = ASPP(N, F, dilations, K, deployed)
        self.conv3 = nn.Sequential(*conv_bn(F, F, 3), nn.ReLU())
        self.up = nn.ConvTranspose2d(F, F, 3, 2, 1, output_padding=1, groups=64)  # DWUpConv
        self.classifier = nn.Conv2d(F, S, 1)

    def forward(self, r_hat, image_size):
        y = self.conv3(self.aspp(r_hat))  # (B, F, H/16, W/16)
        y = crop_to_z(self.up(y), image_size)  # (B, F, H/8, W/8)
        y = self.classifier(y)  # (B, S, H/8, W/8)
        return interpolate(y, image_size, mode="bilinear", align_corners=False)  # (B, S, H, W)


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
    """DeepLabv3 task decoder on z (or z^) [Chen et al. 2017], dilations 12/24/36: torchvision's
    DeepLabHead (1x1 projection, Dropout 0.5, 3x3 conv; the COCO baselines') or, head="mmseg",
    MMSegmentation's ASPPHead (3x3 "bottleneck" projection, Dropout 0.1; the Cityscapes ones')."""

    def __init__(self, C, S, F=256, head="torchvision", dilations=(12, 24, 36)):
        super().__init__()
        if head not in ("torchvision", "mmseg"):
            raise ValueError(f"unknown head {head!r}; choose torchvision or mmseg")
        mm = head == "mmseg"
        self.aspp = ASPP(C, F, dilations, project_kernel=3 if mm else 1, dropout=0.1 if mm else 0.5)
        self.conv3 = nn.Identity() if mm else nn.Sequential(*conv_bn(F, F, 3), nn.ReLU())
        self.classifier = nn.Conv2d(F, S, 1)

    def forward(self, z, image_size):
        y = self.classifier(self.conv3(self.aspp(z)))  # (B, S, H/8, W/8)
        return interpolate(y, image_size, mode="bilinear", align_corners=False)  # (B, S, H, W)


# -----------------------------------------------------------------------------
# the whole system: an edge, a coder, a cloud


class DistributedSegmenter(nn.Module):
    """One system of Fig. 5: edge | hyperprior (the coder of (r, h), None if nothing is sent) |
    cloud, chains of named modules. JD (Fig. 1d): E, SE | coder | JD. Ahuja et al. (Fig. 1c):
    E, SE | coder | SD, D. No Compression: E | - | D. forward(x) trains (noisy latents, Eq. (1));
    compress / decompress are the deployed edge and cloud. output "x_hat": a cloud that rebuilds x."""

    def __init__(self, decoder, edge, hyperprior, cloud, output="logits"):
        super().__init__()
        self.decoder, self.output, self.image_out = decoder, output, output == "x_hat"
        self.edge_names, self.cloud_names = list(edge), list(cloud)
        for name, module in edge.items():
            self.add_module(name, module)
        self.hyperprior = hyperprior
        for name, module in cloud.items():
            self.add_module(name, module)

    def edge(self, x):
        for name in self.edge_names:
            x = getattr(self, name)(x)
        return x  # (r, h), or z without a coder

    def cloud(self, y, image_size):
        for name in self.cloud_names:
            y = getattr(self, name)(y, image_size)
        return y  # logits (B, S, H, W), or x^ (B, 3, H, W)

    def forward(self, x):
        image_size = x.shape[-2:]
        if self.hyperprior is None:  # No Compression
            return {"logits": self.cloud(self.edge(x), image_size), "likelihoods": {}}
        r_hat, likelihoods = self.hyperprior(*self.edge(x))  # noise in training, rounding in eval
        return {self.output: self.cloud(r_hat, image_size), "likelihoods": likelihoods}

    @torch.no_grad()
    def compress(self, x):
        """Edge: images (B, 3, H, W) -> B self-describing byte strings (entropy.py)."""
        if self.hyperprior is None:
            raise ValueError("the No Compression model sends no bitstream")
        return self.hyperprior.compress(*self.edge(x), tuple(x.shape[-2:]))

    @torch.no_grad()
    def decompress(self, strings):
        """Cloud: byte strings of images of one size -> logits (B, S, H, W) (or x^)."""
        if self.hyperprior is None:
            raise ValueError("the No Compression model sends no bitstream")
        r_hat, image_size = self.hyperprior.decompress(strings)  # refuses any bad string
        return self.cloud(r_hat, image_size)


# -----------------------------------------------------------------------------
# a system from its settings; checkpoints

MODEL_KEYS = ("decoder", "num_classes", "F", "K", "encoder", "dilations", "head", "deployed", "codec_N", "codec_M")
EXTRA_SYSTEMS = {"jsde": "extras.jsde", "codec": "extras.learned_codec", "inversion": "extras.privacy"}
DECODERS = ("jd", "ahuja", "none", *EXTRA_SYSTEMS)


def build_model(cfg, N=64):
    """A DistributedSegmenter from a train.py config dict (vars(args)): the method's systems
    here, Fig. 1a/1b's image-codec systems and the attacker from their files in extras/."""
    decoder = cfg["decoder"]
    if decoder in EXTRA_SYSTEMS:  # the one place where the method's files name an extra system
        return importlib.import_module(EXTRA_SYSTEMS[decoder]).build(cfg)
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {', '.join(DECODERS)}")
    S, F = cfg["num_classes"], cfg["F"]
    edge = {"E": E(cfg["encoder"])}
    C = edge["E"].C
    if decoder == "none":
        model = DistributedSegmenter(decoder, edge, None, {"D": D(C, S, F, cfg["head"])})
    else:
        edge["SE"] = SE(C, N)
        hyperprior = HyperpriorCoder(HD(N), N)
        cloud = {"JD": JD(S, F, cfg["K"], N, tuple(cfg["dilations"]), cfg.get("deployed", False))} \
            if decoder == "jd" else {"SD": SD(C, N), "D": D(C, S, F, cfg["head"])}
        model = DistributedSegmenter(decoder, edge, hyperprior, cloud)
    for name, child in model.named_children():
        if name != "E":  # E keeps torchvision's (Kaiming) initialization or its pretrained weights
            kaiming_init(child)
    return model


def save_checkpoint(obj, path):
    """torch.save to a temporary file, flushed to disk, then renamed over `path`: a crash
    at any moment leaves either the old checkpoint or the new one, never a broken file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """(model in eval mode on `device`, checkpoint dict) from a train.py/reparam.py file, read
    with weights_only=True (tensors and plain containers, never code); a file that is not such
    a checkpoint, or whose weights do not fit its settings, is a ValueError that says why."""
    from extras.weights import first_mismatch, read_checkpoint  # the checks of a file from outside
    ckpt = read_checkpoint(path)
    model = build_model(ckpt["args"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit the model its settings describe "
                         f"({first_mismatch(e)})") from None
    return model.to(device).eval(), ckpt
