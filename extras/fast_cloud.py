"""
The deployed cloud's fast path, for the cloud benchmark (extras/benchmark.py): the same
function as JD's and the coder's own forwards, with the float operations in another order
(logits within ~1e-5, masks equal: tested). Nothing runs it unless asked: speed_up(model)
swaps the classes of a deployed model's modules (the state dict, checkpoints and bitstreams
stay as they are), segment(model, strings) is bytes -> masks through it.

    PooledBiasASPP   ASPP with the image-pooling branch as a bias of the 1x1 projection, and the
                     projection as a sum of per-branch matrix products, channels-last
    FoldedTailJD     DWUpConv and the 1x1 classifier as one dense sub-pixel conv; conv3's BN folded
    FastHyperpriorCoder  HD in float64 with the 3x3 conv as 9 matrix products (the same sigma)
    masks, upsampled_masks  the first class at the maximum in byte steps; upsampling in strips
                     of rows that stay in the cache (the same integers as argmax)
Timings: docs/experiments.md, "The cloud benchmark".
"""
import torch
import torch.nn as nn
from torch.nn.functional import adaptive_avg_pool2d, conv2d, interpolate, pad, pixel_shuffle, relu_

from entropy import HyperpriorCoder
from model import ASPP, JD, crop_to_z
from reparam import fuse_conv_bn, is_deployed

# -----------------------------------------------------------------------------
# JD's deployed forwards (each class only replaces forward; the folded kernels are computed from
# the unchanged parameters at every call)


class PooledBiasASPP(ASPP):
    """ASPP whose image-pooling branch enters the 1x1 projection as a per-image bias, and
    whose projection is a sum of matrix products. The pooled branch is constant over the map
    (Fig. 3's UpSampling of a 1x1 map), so its F of the 5F projected channels contribute
    W_pool @ pooled at every position: a bias, without building the broadcast map. The 1x1
    projection of the concatenation [b_0, ..., b_3] is sum_k W_k b_k: each branch's product
    accumulates into y, so the (B, 4F, h, w) concatenation is never built. The branches run
    channels-last (memory (B, h, w, C)), where oneDNN's convs are faster and each b_k is a
    (h*w, F) matrix as it stands.
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
    kernel_up[c, phase]. That replaces a grouped transposed conv (slow in PyTorch on a CPU:
    docs/experiments.md, the cloud benchmark) and its (B, F, H/8, W/8) output by a dense conv to
    4S channels. conv3's BN is folded into its conv (eval mode: an affine map per channel)."""

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


# -----------------------------------------------------------------------------
# the coder's float64 HD, faster


class FastHyperpriorCoder(HyperpriorCoder):
    """The coder with HD's float64 forward (sigma_for_coding) in faster steps: transposed convs
    on channels-last inputs, the 3x3 conv as conv3x3_float64. The same float32 sigma (tested),
    so it decodes every string the plain coder writes, and writes the same bytes."""

    def sigma_for_coding(self, h_hat, size):
        y = h_hat.detach().cpu().double()
        for layer in self.HD:  # a Sequential: ConvTranspose2d, ReLU, ..., Conv2d 3x3; y ends as sigma
            weights = {n: t.detach().cpu().double() for n, t in layer.state_dict().items()}
            if isinstance(layer, nn.Conv2d) and is_plain_3x3(layer):
                y = conv3x3_float64(y, weights["weight"], weights["bias"])
            else:
                if isinstance(layer, nn.ConvTranspose2d):
                    y = y.contiguous(memory_format=torch.channels_last)
                y = torch.func.functional_call(layer, weights, (y,))
        return y[..., : size[0], : size[1]].float().contiguous().to(h_hat.device)


def is_plain_3x3(conv):
    """A Conv2d that conv3x3_float64 computes: 3x3, stride 1, padding 1, no dilation or groups, a bias."""
    return (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.bias is not None) == \
        ((3, 3), (1, 1), (1, 1), (1, 1), 1, True)


def conv3x3_float64(x, weight, bias):
    """conv2d(x, weight, bias, padding=1) for float64 (B, C, H, W) as 9 matrix products on the
    zero-padded map flattened row by row: output pixel (i, j) sits at flat index i(W+2) + j, and
    its tap (dy, dx) at dy(W+2) + dx further on, so each tap is one weight matrix times a shifted
    view. The 2 padding columns of each row are computed too and cut. No im2col copy (PyTorch's
    float64 conv copies); sums within 3e-13 of it."""
    B, C, H, W = x.shape
    flat = torch.nn.functional.pad(x, [1, 1, 1, 1]).flatten(2)  # (B, C, (H+2)(W+2))
    L = (H - 1) * (W + 2) + W  # flat indexes 0 .. L-1 hold every output pixel
    y = bias[None, :, None].repeat(B, 1, L)
    for dy in range(3):
        for dx in range(3):
            start = dy * (W + 2) + dx
            y += weight[:, :, dy, dx] @ flat[:, :, start: start + L]
    return torch.nn.functional.pad(y, [0, 2]).reshape(B, -1, H, W + 2)[..., :W]


# -----------------------------------------------------------------------------
# masks


def masks(logits):
    """The segmentation mask m (B, H, W): per pixel, the class of the largest logit of
    (B, S, H, W), the first one where several are equal: argmax(1). On the CPU, where argmax
    and max(1).indices reduce over the strided class dimension slowly, in fast steps with the
    same integers: the maximum value (amax), which classes reach it (a byte each), and the
    first of them, c, as S minus the largest S - c among them (a byte product and amax)."""
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
    upsampled rows are reduced to classes while still in the cache. Each strip takes one more
    row of y above and below: output row i's source row (i + 1/2)/8 - 1/2 is exact in float, so
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
# the fast deployed cloud


def speed_up(model):
    """Give a model the fast forwards above, in place (returns it): a deployed JD its ASPP and
    tail, every coder its float64 HD. The classes change, the modules and parameters do not."""
    if model.hyperprior is not None:
        model.hyperprior.__class__ = FastHyperpriorCoder
    if model.decoder == "jd" and is_deployed(model.JD):
        model.JD.__class__ = FoldedTailJD
        model.JD.aspp.__class__ = PooledBiasASPP
    return model


def low_res_logits(model, r_hat, image_size):
    """The cloud network's logits at H/8, before the final bilinear upsampling, or None where
    the model has no fast path (the caller then runs model.cloud)."""
    if isinstance(getattr(model, "JD", None), FoldedTailJD):
        return model.JD(r_hat, image_size, upsample=False)
    if model.decoder == "ahuja":
        D = model.D
        return D.classifier(D.conv3(D.aspp(model.SD(r_hat, image_size))))
    return None


@torch.no_grad()
def segment(model, strings):
    """The fast deployed cloud, bytes to masks: byte strings of images of one size -> m (B, H, W),
    the masks of model.decompress(strings).argmax(1)."""
    r_hat, image_size = model.hyperprior.decompress(strings)
    low = low_res_logits(model, r_hat, image_size)
    return masks(model.cloud(r_hat, image_size)) if low is None else upsampled_masks(low, image_size)
