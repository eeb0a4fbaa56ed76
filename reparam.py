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

A deployed checkpoint runs JD's own forward (Fig. 3). Faster forwards of the same function,
for the cloud benchmark, are in extras/fast_cloud.py and run only when asked for.
"""
import argparse
import copy
import sys

import torch
import torch.nn as nn

from data import val_dataset
from model import SubBlock, load_checkpoint, save_checkpoint


def fuse_conv_bn(conv, bn):
    """(kernel, bias) of one conv (no bias) followed by BN with its running statistics."""
    t = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # gamma / s, per output channel
    return conv.weight * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def equivalent_kernel_bias(block: SubBlock):
    """Sum of the fused branches of one ASPP sub-block (Fig. 4a: K dilated 3x3 + one 1x1;
    Fig. 4b: K 1x1)."""
    kernel, bias = 0, 0
    for conv, bn in block.branches:
        k, b = fuse_conv_bn(conv, bn)
        if k.shape[-1] == 1 and block.kernel_size == 3:
            k = torch.nn.functional.pad(k, [1, 1, 1, 1])  # the 1x1 weight becomes the centre tap
        kernel, bias = kernel + k, bias + b
    return kernel, bias


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

    cloud_params = [sum(p.numel() for mod in (m.hyperprior, m.JD) for p in mod.parameters()) for m in (model, deployed)]
    cfg = ckpt["args"]
    val, _ = val_dataset(cfg, limit=args.n_images)  # the images the checkpoint was trained on
    x = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        diff = (model(x)["logits"] - deployed(x)["logits"]).abs().max().item()
    print(f"{'':24s} {'training time (K=' + str(cfg['K']) + ')':>22s} {'deployed':>12s}")
    print(f"{'cloud params (JD + HD)':24s} {cloud_params[0]:22,d} {cloud_params[1]:12,d}")
    print(f"{'whole model params':24s} {sum(p.numel() for p in model.parameters()):22,d} "
          f"{sum(p.numel() for p in deployed.parameters()):12,d}")
    print(f"max |logits difference| on {len(x)} val images, eval mode, float32: {diff:.2e}")
    save_checkpoint({"model": deployed.state_dict(), "args": {**cfg, "deployed": True},
                     "iter_num": ckpt.get("iter_num")}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, no traceback
        sys.exit(f"error: {e}")
