"""
The hyperprior rate model and the real bitstreams (paper Sec. 3.1, Fig. 2, Eq. (1)).

Training:  r -> r + U(-1/2, 1/2), h -> h + U(-1/2, 1/2); the rate is -log2 of the
           likelihoods, Eq. (1). Inference: true rounding, and CompressAI's rANS coder turns
           h^ into b_h (EntropyBottleneck, a learned factorized prior) and r^ into b_r
           (GaussianConditional, zero-mean, sigma = HD(h^)).

One image becomes one self-describing byte string (the "container"):

    offset  size  field
    0       4     magic b"DSSJ"
    4       1     format version
    5       2+2   input image H, W
    9       2     latent channels N
    11      2+2   r^ height, width          (H/16, W/16 for an output-stride-8 encoder)
    15      2+2   h^ height, width          (r^'s size / 4, rounded up)
    19      4+4   payload lengths of b_h, b_r
    27      4     model id: CRC32 of the entropy models' CDF tables and HD's weights
    31      4     CRC32 of bytes 0..30 and of the payload
    35      ...   b_h, then b_r

A string that is truncated, bit-flipped, foreign, or written by another model is refused
with a ValueError that says which; it is never decoded into garbage.

Used by model.py (the edge's compress, the cloud's decompress) and train.py (Eq. (1), the
main/aux optimizer split).
"""
import math
import struct
import warnings
import zlib

import torch
import torch.nn as nn

# compressai imports torch_geometric, which warns that torch.jit.script is deprecated
warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script.*")
from compressai.entropy_models import EntropyBottleneck, GaussianConditional  # noqa: E402
from compressai.models.base import get_scale_table  # noqa: E402
from compressai.models.utils import update_registered_buffers  # noqa: E402

MAGIC = b"DSSJ"  # Distributed Semantic Segmentation, Joint decoding
VERSION = 1
HEADER = struct.Struct(">4sB HH H HH HH II I I")  # big-endian, 35 bytes, see the table above


def bits_per_pixel(likelihoods, num_pixels):
    """Eq. (1): (-sum log2 p(r^|h^) - sum log2 p(h^)) / (H*W), averaged over the batch.
    num_pixels = B*H*W of the input images."""
    return sum(torch.log(p).sum() for p in likelihoods.values()) / (-math.log(2) * num_pixels)


def split_parameters(model):
    """Main and aux parameter lists (CompressAI's two-optimizer recipe, Supplement Sec. 1):
    aux = only EntropyBottleneck.quantiles, main = everything else. Asserts the split is
    disjoint and complete."""
    named = dict(model.named_parameters())
    aux = {n for n in named if n.endswith(".quantiles")}
    main = {n for n in named if not n.endswith(".quantiles")}
    assert not (main & aux) and main | aux == set(named), "optimizer split must be exact"
    return [named[n] for n in sorted(main)], [named[n] for n in sorted(aux)]


class HyperpriorCoder(nn.Module):
    """Entropy models of the scale hyperprior [Balle et al. 2018] around a given HD.

        h --EB--> h^ (b_h)  --HD--> sigma  --GC(0, sigma)--> r^ (b_r)

    forward(r, h) gives r^ and the likelihoods (noise in training, rounding in eval);
    compress/decompress mirror it with real bitstreams in the container above.
    The entropy models always run in float32 (a float16 autocast underflows the 1e-9
    likelihood floor and the rate becomes infinite; bf16 outside them is fine)."""

    def __init__(self, HD: nn.Module, N=64):
        super().__init__()
        self.N = N
        self.HD = HD  # hyper-decoder, shared by edge (to code r) and cloud (to decode r)
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.gaussian_conditional = GaussianConditional(None)  # sigma lower-bounded at 0.11

    def forward(self, r, h):
        with torch.autocast(r.device.type, enabled=False):
            r, h = r.float(), h.float()
            h_hat, p_h = self.entropy_bottleneck(h)
            sigma = self.HD(h_hat)[..., : r.shape[-2], : r.shape[-1]]  # HD gives 4x h's size
            r_hat, p_r = self.gaussian_conditional(r, sigma)
        return r_hat, {"r": p_r, "h": p_h}

    def aux_loss(self):
        return self.entropy_bottleneck.loss()

    def update(self, force=False):
        """Build the CDF tables the coder needs (call after training, before compress)."""
        updated = self.entropy_bottleneck.update(force=force)
        updated |= self.gaussian_conditional.update_scale_table(get_scale_table(), force=force)
        return updated

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the CDF buffers change size in update(): resize ours to the checkpoint's first
        for name, buffers in (("entropy_bottleneck", ["_quantized_cdf", "_offset", "_cdf_length"]),
                              ("gaussian_conditional", ["_quantized_cdf", "_offset", "_cdf_length",
                                                        "scale_table"])):
            if all(f"{prefix}{name}.{b}" in state_dict for b in buffers):
                update_registered_buffers(getattr(self, name), prefix + name, buffers, state_dict,
                                          policy="resize")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def model_id(self):
        """CRC32 over everything both ends must share to code r: the CDF tables and HD's
        weights. A string from another model (or from before an update) is refused."""
        crc = zlib.crc32(struct.pack(">H", self.N))
        tensors = [self.entropy_bottleneck._quantized_cdf, self.entropy_bottleneck._offset,
                   self.entropy_bottleneck._cdf_length, self.entropy_bottleneck.quantiles,
                   self.gaussian_conditional._quantized_cdf, self.gaussian_conditional._offset,
                   self.gaussian_conditional._cdf_length, self.gaussian_conditional.scale_table,
                   *self.HD.state_dict().values()]
        for t in tensors:
            crc = zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes(), crc)
        return crc

    def _sigma_for_coding(self, h_hat, size):
        # Encoder and decoder must compute bit-identical scale indexes, or b_r decodes into
        # garbage. Different hardware or thread counts change float32 convolutions in the last
        # bits, so both ends run HD on the CPU in float64 and only then round to float32.
        weights = {n: t.detach().cpu().double() for n, t in self.HD.state_dict().items()}
        sigma = torch.func.functional_call(self.HD, weights, (h_hat.detach().cpu().double(),))
        return sigma[..., : size[0], : size[1]].float().to(h_hat.device)

    @torch.no_grad()
    def compress(self, r, h, image_size):
        """r (B, N, H/16, W/16), h (B, N, H/64, W/64) -> B containers (bytes)."""
        r, h = r.float(), h.float()
        b_h = self.entropy_bottleneck.compress(h)
        h_hat = self.entropy_bottleneck.decompress(b_h, h.shape[-2:])
        indexes = self.gaussian_conditional.build_indexes(self._sigma_for_coding(h_hat, r.shape[-2:]))
        b_r = self.gaussian_conditional.compress(r, indexes)
        model_id = self.model_id()
        return [pack(s_h, s_r, image_size, r.shape[1:], h.shape[-2:], model_id)
                for s_h, s_r in zip(b_h, b_r)]

    @torch.no_grad()
    def decompress(self, strings):
        """B containers (bytes) of equal image size -> r^ (B, N, H/16, W/16), (H, W)."""
        model_id = self.model_id()
        fields = [unpack(s, model_id, self.N) for s in strings]
        shapes = {f["image_size"] + f["r_size"] for f in fields}
        if len(shapes) != 1:
            raise ValueError(f"cannot batch strings of different image sizes {sorted(shapes)}; "
                             "decode them one at a time")
        h_size, r_size = fields[0]["h_size"], fields[0]["r_size"]
        device = self.entropy_bottleneck.quantiles.device
        h_hat = self.entropy_bottleneck.decompress([f["b_h"] for f in fields], h_size).to(device)
        indexes = self.gaussian_conditional.build_indexes(self._sigma_for_coding(h_hat, r_size))
        r_hat = self.gaussian_conditional.decompress([f["b_r"] for f in fields], indexes)
        return r_hat.to(device), fields[0]["image_size"]


def pack(b_h, b_r, image_size, r_shape, h_size, model_id):
    """The container: header (see the module docstring), then b_h and b_r."""
    N, rh, rw = r_shape
    head = HEADER.pack(MAGIC, VERSION, *image_size, N, rh, rw, *h_size, len(b_h), len(b_r),
                       model_id, 0)[:-4]
    return head + struct.pack(">I", zlib.crc32(b_h + b_r, zlib.crc32(head))) + b_h + b_r


def unpack(data, model_id=None, N=None):
    """Parse and check one container; raises ValueError naming what is wrong."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"expected bytes, got {type(data).__name__}")
    if len(data) < HEADER.size:
        raise ValueError(f"truncated bitstream: {len(data)} bytes, the header alone is {HEADER.size}")
    magic, version, H, W, n, rh, rw, hh, hw, len_h, len_r, mid, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"not a {MAGIC.decode()} bitstream (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ValueError(f"bitstream format version {version}; this decoder reads version {VERSION}")
    if len(data) != HEADER.size + len_h + len_r:
        what = "truncated" if len(data) < HEADER.size + len_h + len_r else "trailing bytes in"
        raise ValueError(f"{what} bitstream: header announces {HEADER.size + len_h + len_r} bytes, "
                         f"got {len(data)}")
    payload = bytes(data[HEADER.size:])
    if zlib.crc32(payload, zlib.crc32(bytes(data[:HEADER.size - 4]))) != crc:
        raise ValueError("corrupted bitstream: CRC32 of header and payload does not match")
    if model_id is not None and mid != model_id:
        raise ValueError(f"bitstream was written by another model (model id {mid:08x}, this "
                         f"decoder is {model_id:08x}): decode it with the checkpoint that encoded it")
    if N is not None and n != N:
        raise ValueError(f"bitstream has {n} latent channels, the decoder expects {N}")
    if (hh, hw) != (-(-rh // 4), -(-rw // 4)):
        raise ValueError(f"inconsistent latent shapes in header: r {rh}x{rw}, h {hh}x{hw}")
    return {"image_size": (H, W), "r_size": (rh, rw), "h_size": (hh, hw),
            "b_h": payload[:len_h], "b_r": payload[len_h:]}
