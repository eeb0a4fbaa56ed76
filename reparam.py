"""
Undo the training-time over-parameterization for inference (Sec. 3.3, Fig. 4): each ASPP
sub-block of JD trains as K (+1) parallel conv+BN branches; for deployment they are folded
into one convolution with bias, so a K = 3 JD costs in the cloud exactly what the plain
Fig. 3 JD costs. After RepVGG [Ding et al. 2021] and MobileOne [Vasu et al. 2023].

    python reparam.py --ckpt out/synthetic/ckpt.pt --out out/synthetic/deployed.pt

In eval mode each branch is linear: BN(conv(x)) = conv(x; w*gamma/s) + (beta - mu*gamma/s), with
s = sqrt(var + eps). A sum of convolutions over the same input with the same stride and
padding is one convolution with the summed kernels; a 1x1 kernel is a 3x3 kernel with zeros
around its centre tap, and dilation leaves the centre tap where it is.

speed_up then gives the deployed JD two faster forwards of the same function (same
parameters, same state dict; only the order of float operations differs): the image-pooling
branch as a bias of ASPP's projection and the projection without the concatenation, in
channels-last layout, and DWUpConv with the 1x1 classifier as one sub-pixel conv.
"""
import argparse
import copy
import sys

import torch
import torch.nn as nn
from torch.nn.functional import adaptive_avg_pool2d, conv2d, interpolate, pad, pixel_shuffle, relu_

from data import val_dataset
from model import ASPP, JD, SubBlock, crop_to_z, load_checkpoint, save_checkpoint


def fuse_conv_bn(conv, bn):
    """(kernel, bias) of one conv (no bias) followed by BN with its running statistics."""
    t = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # gamma / s, per output channel
    return conv.weight * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def pad_1x1_to_3x3(kernel):
    return torch.nn.functional.pad(kernel, [1, 1, 1, 1])  # the 1x1 weight becomes the centre tap


def equivalent_kernel_bias(block: SubBlock):
    """Sum of the fused branches of one ASPP sub-block (Fig. 4a: K dilated 3x3 + one 1x1;
    Fig. 4b: K 1x1)."""
    kernel, bias = 0, 0
    for conv, bn in block.branches:
        k, b = fuse_conv_bn(conv, bn)
        if k.shape[-1] == 1 and block.kernel_size == 3:
            k = pad_1x1_to_3x3(k)
        kernel, bias = kernel + k, bias + b
    return kernel, bias


# -----------------------------------------------------------------------------
# the deployed cloud's faster forwards: the same sums in another order (logits within ~1e-5,
# masks equal in the tests). Each class only replaces forward, so the state dict, the
# checkpoints and JD.forward (Fig. 3) stay as they are; the folded kernels are recomputed from
# the unchanged parameters at every call (well under 1 ms). Measured in evaluate.py --benchmark.


class PooledBiasASPP(ASPP):
    """ASPP whose image-pooling branch enters the 1x1 projection as a per-image bias, and
    whose projection is a sum of matrix products. The pooled branch is constant over the map
    (Fig. 3's UpSampling of a 1x1 map), so its F of the 5F projected channels contribute
    W_pool @ pooled at every position: a bias, without building the broadcast map. The 1x1
    projection of the concatenation [b_0, ..., b_3] is sum_k W_k b_k: each branch's product
    accumulates into y, so the (B, 4F, h, w) concatenation is never built. The branches run
    channels-last (memory (B, h, w, C)), where oneDNN's convs are faster and each b_k is a
    (h*w, F) matrix as it stands (1024x2048: this ASPP 256-285 ms, the concatenating one 361-381).
    The projection's BN is folded in too (eval mode: an affine map per channel)."""

    def forward(self, x):
        kernel, bias = fuse_conv_bn(self.project[0], self.project[1])  # (F, 5F, 1, 1), (F,)
        assert kernel.shape[-1] == 1, "JD projects with a 1x1 conv"
        F, (B, _, h, w) = kernel.shape[0], x.shape
        pooled = self.pool(adaptive_avg_pool2d(x, 1))[:, :, 0, 0]  # (B, F)
        bias = bias + pooled @ kernel[:, -F:, 0, 0].T  # (B, F): the pooled branch's share
        x = x.contiguous(memory_format=torch.channels_last)
        y = bias[:, None, :].expand(B, h * w, F).contiguous()  # (B, h*w, F)
        for k, branch in enumerate([self.b0, *self.dilated]):  # y += b_k(x) W_k^T, k = 0..3
            b_k = relu_(branch.branches[0](x)).permute(0, 2, 3, 1).reshape(B, h * w, F)  # deployed: one conv
            y.baddbmm_(b_k, kernel[:, k * F:(k + 1) * F, 0, 0].T.expand(B, F, F))  # b_k: a view, channels-last
        return relu_(y).reshape(B, h, w, F).permute(0, 3, 1, 2)  # (B, F, h, w), channels-last; no Dropout in eval


def dwupconv_phase_kernel(up):
    """DWUpConv (transposed 3x3 conv, stride 2, padding 1, output_padding 1, G groups) as a
    2x2 grouped conv to the 4 output phases, to be followed by pixel shuffle [Shi et al. 2016]:
    output pixel (2i+a, 2j+b) sums kernel taps from input row i (tap 1 if a = 0, else tap 2)
    and row i+1 (tap 0, only if a = 1); the same for columns. Returns (G, Cout/G, 4, Cin/G,
    2, 2): for each output channel its 4 phases (a, b) = (0,0), (0,1), (1,0), (1,1)."""
    assert up.kernel_size == (3, 3) and up.stride == (2, 2) and up.padding == (1, 1) and up.output_padding == (1, 1)
    G, cin_g = up.groups, up.in_channels // up.groups
    w = up.weight.reshape(G, cin_g, -1, 3, 3).transpose(1, 2)  # (G, Cout/G, Cin/G, 3, 3)
    taps = ({0: 1}, {0: 2, 1: 0})  # phase -> {input offset: kernel tap}
    k = w.new_zeros(G, w.shape[1], 2, 2, cin_g, 2, 2)
    for a in (0, 1):
        for b in (0, 1):
            for di, ki in taps[a].items():
                for dj, kj in taps[b].items():
                    k[:, :, a, b, :, di, dj] = w[..., ki, kj]
    return k.reshape(G, w.shape[1], 4, cin_g, 2, 2)


class FoldedTailJD(JD):
    """JD whose DWUpConv and 1x1 classifier run as one dense sub-pixel conv. Nothing
    nonlinear lies between them in Fig. 3, so classifier o DWUpConv is one transposed conv
    from F to S channels: on the 4 output phases, kernel[s, phase] = sum_c W_cls[s, c] *
    kernel_up[c, phase]. That replaces a grouped transposed conv, which PyTorch runs at under
    2 GMAC/s on CPU, and its (B, F, H/8, W/8) output by a dense conv to 4S channels. conv3's
    BN is folded into its conv (eval mode: an affine map per channel)."""

    def forward(self, r_hat, image_size, upsample=True):
        k3, b3 = fuse_conv_bn(self.conv3[0], self.conv3[1])  # conv3 = conv, BN, ReLU
        y = relu_(conv2d(self.aspp(r_hat), k3, b3, padding=self.conv3[0].padding))  # (B, F, H/16, W/16)
        G = self.up.groups
        k_up = dwupconv_phase_kernel(self.up)  # (G, F/G, 4, F/G, 2, 2)
        w_cls = self.classifier.weight[:, :, 0, 0]  # (S, F)
        kernel = torch.einsum("sgo,gopikl->spgikl", w_cls.reshape(-1, G, k_up.shape[1]), k_up)
        kernel = kernel.reshape(-1, self.up.in_channels, 2, 2)  # (4S, F, 2, 2), channel 4s + phase
        bias = (w_cls @ self.up.bias + self.classifier.bias).repeat_interleave(4)
        y = pixel_shuffle(conv2d(pad(y, [0, 1, 0, 1]), kernel, bias), 2)  # row/col i+1 past the end: 0
        y = crop_to_z(y, image_size).contiguous()  # (B, S, H/8, W/8)
        return interpolate(y, image_size, mode="bilinear", align_corners=False) if upsample else y


def speed_up(model):
    """Give a deployed JD model the faster forwards above (in place; returns the model). The
    classes change, the modules and parameters do not: the same state dict, checkpoint and
    bitstreams. evaluate.py applies it to the benchmark and to deployed checkpoints."""
    if model.decoder == "jd" and is_deployed(model.JD):
        model.JD.__class__ = FoldedTailJD
        model.JD.aspp.__class__ = PooledBiasASPP
    return model


def is_deployed(model):
    return all(isinstance(b.branches[0], nn.Conv2d) for b in model.modules() if isinstance(b, SubBlock))


@torch.no_grad()
def reparameterize(model, inplace=False):
    """The deployed copy of a JD model (or the model itself with inplace=True): every ASPP
    sub-block of JD becomes one conv with bias. E, SE, the entropy models and HD are left
    untouched, so the bitstreams and their model id do not change. Refuses a model in
    training mode (BN would not be using the running statistics the fusion bakes in) and a
    model that is already deployed."""
    if model.decoder != "jd":
        raise ValueError(f"only JD is over-parameterized; this is a {model.decoder!r} model")
    if model.training:
        raise ValueError("call model.eval() before fusing: fusion bakes in BN's running statistics, "
                         "which a model in training mode does not use")
    if is_deployed(model.JD):
        raise ValueError("this JD is already deployed (one conv per sub-block); nothing to fuse")
    model = model if inplace else copy.deepcopy(model)
    for block in model.JD.modules():
        if isinstance(block, SubBlock):
            kernel, bias = equivalent_kernel_bias(block)
            first = block.branches[0][0]
            conv = nn.Conv2d(first.in_channels, first.out_channels, block.kernel_size,
                             padding=first.padding, dilation=first.dilation, bias=True).to(kernel)
            conv.weight.copy_(kernel)
            conv.bias.copy_(bias)
            block.branches = nn.ModuleList([conv]).eval()
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint of a JD model")
    p.add_argument("--out", required=True, help="where the deployed checkpoint goes")
    p.add_argument("--n-images", type=int, default=4, help="val images to compare the logits on")
    args = p.parse_args()

    model, ckpt = load_checkpoint(args.ckpt)
    deployed = reparameterize(model)

    def cloud_params(m):
        return sum(p.numel() for mod in (m.hyperprior, m.JD) for p in mod.parameters())

    cfg = ckpt["args"]
    val, _ = val_dataset(cfg, limit=args.n_images)  # the images the checkpoint was trained on
    x = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        diff = (model(x)["logits"] - deployed(x)["logits"]).abs().max().item()
        diff_fast = (model(x)["logits"] - speed_up(copy.deepcopy(deployed))(x)["logits"]).abs().max().item()
    print(f"{'':24s} {'training time (K=' + str(cfg['K']) + ')':>22s} {'deployed':>12s}")
    print(f"{'cloud params (JD + HD)':24s} {cloud_params(model):22,d} {cloud_params(deployed):12,d}")
    print(f"{'whole model params':24s} {sum(p.numel() for p in model.parameters()):22,d} "
          f"{sum(p.numel() for p in deployed.parameters()):12,d}")
    print(f"max |logits difference| on {len(x)} val images, eval mode, float32: {diff:.2e} "
          f"({diff_fast:.2e} with speed_up's forwards)")
    save_checkpoint({"model": deployed.state_dict(), "args": {**cfg, "deployed": True},
                     "iter_num": ckpt.get("iter_num")}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, no traceback
        sys.exit(f"error: {e}")
