"""
The hyperprior rate model and the real bitstreams (paper Sec. 3.1, Fig. 2, Eq. (1)).

Training:  r -> r + U(-1/2, 1/2), h -> h + U(-1/2, 1/2); the rate is -log2 of the
           likelihoods, Eq. (1). Inference: true rounding, and CompressAI's rANS coder turns
           h^ into b_h (EntropyBottleneck, a learned factorized prior) and r^ into b_r
           (GaussianConditional, zero-mean, sigma = HD(h^)).

One image becomes one self-describing byte string (the "container", format version 3):

    offset  size  field
    0       1     format byte 0xD3 (0xDB keyed): magic nibble 0xD ("DSSJ"), bit 3 set when
                  keyed, format version 3 in the low 3 bits
    1       1     model tag: the low 8 bits of the model id (names a foreign model's string)
    2       1-3   image H, unsigned LEB128 varint (7 bits a byte, the shortest encoding only)
    .       1-3   image W, varint
    .       1-3   length of b_h in bytes, varint
    .       1-3   (k - 1 times) length of each b_r stream but the last, varint
    .       4     check value: CRC32 over the 4-byte model id, the header bytes before it,
                  and the payload (16 bytes keyed: HMAC-SHA256 of the same, cut to 128 bits).
                  The model id is a CRC32 of the entropy models' CDF tables and HD's weights.
    .       ...   b_h, then the k streams of b_r (the last is the rest of the string)

b_r is k = ceil(M h w / STREAM_SYMBOLS) rANS streams (one up to 512x1024, four at 1024x2048).
What the model and the image size determine is not sent: the channels, the latents' sizes, k.
At 128x256 the header is 11 bytes (0.0027 bpp); keyed, 23 (0.0056 bpp).

Every string is hostile until proven otherwise: decoded or refused with a ValueError that says
why, its work bounded by its declared image size, its header checked before the payload is read
(extras/bitstream_guard.py). The CRC catches damage and strings of another model, not a forger:
the keyed mode does (evaluate.py --key-file; bitstream_guard.py says what it protects).
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

MAGIC = 0xD0  # high nibble of the format byte: "DSSJ" (Distributed Semantic Segmentation, Joint decoding)
VERSION = 3
STREAM_SYMBOLS = 2**17  # b_r is cut into rANS streams of at most this many symbols (docstring)
MAX_IMAGE_PIXELS = 2048 * 4096  # the largest image a string may declare, counted on h^'s grid
#                                  (bitstream_guard.check_image_size); 4x a Cityscapes frame
KEYED = 0x08  # bit 3 of the format byte: the check value is a keyed MAC (docstring)


def bits_per_pixel(likelihoods, num_pixels):
    """Eq. (1): (-sum log2 p(r^|h^) - sum log2 p(h^)) / (H*W), averaged over the batch.
    num_pixels = B*H*W of the input images."""
    return sum(torch.log(p).sum() for p in likelihoods.values()) / (-math.log(2) * num_pixels)


def split_parameters(model):
    """Main and aux parameter lists (CompressAI's two-optimizer recipe, Supplement Sec. 1):
    aux = only EntropyBottleneck.quantiles, main = everything else, each sorted by name."""
    named = sorted(model.named_parameters())
    aux = [p for n, p in named if n.endswith(".quantiles")]
    return [p for n, p in named if not n.endswith(".quantiles")], aux


class HyperpriorCoder(nn.Module):
    """Entropy models of the scale hyperprior [Balle et al. 2018] around a given HD:
    h --EB--> h^ (b_h) --HD--> sigma --GC(0, sigma)--> r^ (b_r). forward(r, h) gives r^ and the
    likelihoods (noise in training, rounding in eval); compress/decompress code real bitstreams.
    The entropy models run in float32 (float16 underflows the 1e-9 likelihood floor)."""

    def __init__(self, HD: nn.Module, N=64, M=None):
        super().__init__()
        self.N = N  # channels of h
        self.M = M or N  # channels of r (N in JD and Ahuja et al.; M = 320 for the codec's y)
        self.HD = HD  # hyper-decoder, shared by edge (to code r) and cloud (to decode r)
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.gaussian_conditional = GaussianConditional(None)  # sigma lower-bounded at 0.11
        self.key = None  # bytes shared by edge and cloud: strings carry a keyed MAC (docstring); not saved

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

    def scale_indexes(self, sigma):
        """The GaussianConditional's CDF index of each sigma: CompressAI's build_indexes' integers
        (scale-table entries below the lower-bounded sigma) by one bucketize, not 64 passes."""
        gc = self.gaussian_conditional
        return torch.bucketize(gc.lower_bound_scale(sigma), gc.scale_table[:-1].to(sigma)).int()

    def sigma_for_coding(self, h_hat, size):
        """sigma = HD(h^), cropped to r's size, as both ends compute it. They must agree to the
        bit, or b_r decodes into garbage; other hardware or thread counts change float32 convs
        in the last bits, so HD runs on the CPU in float64 and is only then rounded to float32."""
        weights = {n: t.detach().cpu().double() for n, t in self.HD.state_dict().items()}
        sigma = torch.func.functional_call(self.HD, weights, (h_hat.detach().cpu().double(),))
        return sigma[..., : size[0], : size[1]].float().contiguous().to(h_hat.device)

    @torch.no_grad()
    def compress(self, r, h, image_size):
        """r (B, M, H/16, W/16), h (B, N, H/64, W/64) -> B containers (bytes)."""
        r, h = r.float(), h.float()
        if r.shape[-2:] != latent_size(image_size) or h.shape[-2:] != hyper_size(image_size):
            raise ValueError(f"latents {tuple(r.shape[-2:])} and {tuple(h.shape[-2:])} do not fit an image of "
                             f"{tuple(image_size)}: the container assumes an encoder of stride 16 and 64")
        guard().check_image_size(image_size)  # what no cloud would decode is not sent
        eb, gc = self.entropy_bottleneck, self.gaussian_conditional
        medians = eb._get_medians().detach().reshape(1, -1, 1, 1)
        symbols_h = torch.round(h - medians)  # CompressAI's "symbols" quantization of h
        guard().check_codable(symbols_h, "h - median")
        b_h = rans_encode(eb, symbols_h, self._channel_indexes(h))
        h_hat = symbols_h + medians  # what the cloud decodes
        indexes = self.scale_indexes(self.sigma_for_coding(h_hat, r.shape[-2:]))
        k = r_streams(self.M, image_size)
        b_r = []  # k lists of B strings
        for symbols, i in zip(r_split(torch.round(r), k), r_split(indexes, k)):
            guard().check_codable(symbols, "r")
            b_r.append(rans_encode(gc, symbols, i))
        model_id = self.model_id()
        return [pack(s_h, list(s_r), image_size, model_id, self.key) for s_h, *s_r in zip(b_h, *b_r)]

    @torch.no_grad()
    def decompress(self, strings):
        """B containers (bytes) of equal image size -> r^ (B, M, H/16, W/16), (H, W)."""
        model_id = self.model_id()
        fields = [guard().unpack(s, model_id, self.N, self.M, self.key) for s in strings]  # checks before decoding
        sizes = {f["image_size"] for f in fields}
        if len(sizes) != 1:
            raise ValueError(f"cannot batch strings of different image sizes {sorted(sizes)}; "
                             "decode them one at a time")
        image_size = fields[0]["image_size"]
        device = self.entropy_bottleneck.quantiles.device
        eb, gc = self.entropy_bottleneck, self.gaussian_conditional
        medians = eb._get_medians().detach().reshape(1, -1, 1, 1).cpu()
        indexes = self._channel_indexes(torch.empty(len(fields), self.N, *hyper_size(image_size)))
        symbols_h = guard().rans_decode(eb, [f["b_h"] for f in fields], indexes, "b_h")
        h_hat = (symbols_h + medians).to(device)  # on the model's device, as in compress
        indexes = self.scale_indexes(self.sigma_for_coding(h_hat, latent_size(image_size))).cpu()
        k = len(fields[0]["b_r"])  # r_streams(M, image_size), as unpack parsed them
        r_hat = [guard().rans_decode(gc, [f["b_r"][c] for f in fields], i, "b_r")  # stream by stream
                 for c, i in enumerate(r_split(indexes, k))]
        return torch.cat(r_hat, 1).reshape(indexes.shape).to(device), image_size

    @staticmethod
    def _channel_indexes(h):
        """The EntropyBottleneck's CDF index of each element of h: its channel."""
        return torch.arange(h.shape[1]).reshape(1, -1, 1, 1).expand(h.shape)


def latent_size(image_size):
    """r's size for an H x W image: E has output stride 8, SE's g_a stride 2."""
    return -(-image_size[0] // 16), -(-image_size[1] // 16)


def hyper_size(image_size):
    """h's size: SE's h_a has stride 4 on r."""
    rh, rw = latent_size(image_size)
    return -(-rh // 4), -(-rw // 4)


def r_streams(M, image_size):
    """k, the number of rANS streams that carry the M x ceil(H/16) x ceil(W/16) symbols of b_r."""
    rh, rw = latent_size(image_size)
    return -(-M * rh * rw // STREAM_SYMBOLS)


def r_split(t, k):
    """r^'s symbols or CDF indexes (B, M, h, w) -> the k parts (B, n) that b_r's streams carry:
    consecutive in (channel, row, column) order, as equal as possible. Edge and cloud both cut here."""
    return t.flatten(1).tensor_split(k, 1)


# -----------------------------------------------------------------------------
# rANS coding, through CompressAI's C++ coder


def guard():
    """The hostile-input checks (extras/bitstream_guard.py), imported when bits are coded: the
    encoder takes only latents it can code; every string is decoded or refused (ValueError)."""
    import extras.bitstream_guard
    return extras.bitstream_guard


def coder_tables(entropy_model, indexes):
    """The CDF rows that `indexes` use, as lists for the C++ coder, and the indexes into
    them: converting the whole Gaussian table (64 x ~3000 ints) would dominate small images."""
    if entropy_model._quantized_cdf.numel() == 0:
        raise ValueError("the entropy models have no CDF tables yet: call update() after training")
    used, compact = torch.unique(indexes.flatten().cpu(), return_inverse=True)
    lengths = entropy_model._cdf_length.cpu()[used]
    cdfs = entropy_model._quantized_cdf.cpu()[used, : int(lengths.max())]
    return compact.tolist(), cdfs.tolist(), lengths.tolist(), entropy_model._offset.cpu()[used].tolist()


def rans_encode(entropy_model, symbols, indexes):
    """Integer symbols (B, ...) with their CDF indexes -> B rANS byte strings, as CompressAI's
    EntropyModel.compress writes them (the same coder, the same rows of the same tables)."""
    return [entropy_model.entropy_coder.encode_with_indexes(s.flatten().int().tolist(), *coder_tables(entropy_model, i))
            for s, i in zip(symbols, indexes)]


# -----------------------------------------------------------------------------
# the container


def varint(n):
    """Unsigned LEB128: 7 bits a byte, low bits first, high bit set on all but the last byte."""
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def pack(b_h, b_r, image_size, model_id, key=None):
    """The container (module docstring): header, check value, b_h, the list of b_r streams."""
    head = bytes([MAGIC | (KEYED if key is not None else 0) | VERSION, model_id & 0xFF])
    head += varint(image_size[0]) + varint(image_size[1]) + b"".join(varint(len(b)) for b in [b_h, *b_r[:-1]])
    payload = b_h + b"".join(b_r)
    return head + guard().check_value(model_id, head, payload, key) + payload
