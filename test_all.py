"""
Tests: CPU only, tiny shapes, fixed seeds. Each states its invariant in its docstring.

    python -m pytest -q test_all.py
"""
import ast
import contextlib
import copy
import io
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch.nn.functional import interpolate

import entropy
import PIL.features
from PIL import Image

from data import SYNTHETIC_CLASSES, SyntheticStreets, get_dataset, preset, val_dataset
from entropy import HyperpriorCoder, bits_per_pixel, split_parameters
from evaluate import (benchmark_cloud, code_image, codec_rd, complexity, confusion_matrix, from_bitstreams,
                      get_args_parser, image_codec_format, iou, rd_compare, rd_points, save_bitstreams)
import evaluate as evaluate_module
from evaluate import main as evaluate_main
from model import (HD, SE, DistributedSegmenter, E, build_model, load_checkpoint, load_codec_weights,
                   load_encoder_weights, masks, save_checkpoint, upsampled_masks)
from reparam import reparameterize, speed_up

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_model(decoder="jd", K=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(S=5, F=64, K=K, encoder="resnet18-l2", dilations=(1, 2, 3))
    cfg.update(kw)
    return DistributedSegmenter(decoder, **cfg)


def count(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


# -----------------------------------------------------------------------------
# structure

CARD = ["model.py", "entropy.py", "data.py", "train.py", "evaluate.py", "reparam.py"]


def test_no_import_cycle():
    """No module of the card imports another that imports it back, directly or through others;
    every import statement counts, also those inside functions."""
    ours = {f[:-3] for f in CARD}
    graph = {}
    for f in CARD:
        tree = ast.parse(open(os.path.join(HERE, f)).read())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        graph[f[:-3]] = {n.split(".")[0] for n in names} & ours
    assert graph["reparam"] == {"data", "model"} and "train" not in set().union(*graph.values())

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in graph[a])
    assert not [m for m in graph if reaches(m, m)]


# -----------------------------------------------------------------------------
# networks


@pytest.mark.parametrize("decoder", ["jd", "ahuja", "none"])
def test_shapes_odd_sizes(decoder):
    """Every decoder maps (B,3,H,W) to (B,S,H,W) logits for H, W not multiples of 64,
    with r at ceil(H/16) and h at ceil(H/64)."""
    model = tiny_model(decoder)
    x = torch.randn(2, 3, 70, 99)
    out = model(x)
    assert out["logits"].shape == (2, 5, 70, 99)
    if decoder != "none":
        assert out["likelihoods"]["r"].shape == (2, 64, 5, 7)
        assert out["likelihoods"]["h"].shape == (2, 64, 2, 2)
    model.eval()
    assert model(x[:1])["logits"].shape == (1, 5, 70, 99)


def test_resnet50_encoder_output_stride_8():
    """The paper's E: dilated ResNet-50 gives z with 2048 channels at ceil(H/8)."""
    model = DistributedSegmenter("jd", S=3, F=64, K=1, encoder="resnet50").eval()
    with torch.no_grad():
        z = model.E(torch.randn(1, 3, 65, 47))
    assert z.shape == (1, 2048, 9, 6)


def test_over_parameterized_branches():
    """Fig. 4: a dilated sub-block has K 3x3 branches + one 1x1; pointwise ones have K;
    K=0 is the plain Fig. 3 block; deployed is one conv with bias."""
    for K in (0, 1, 3):
        jd = tiny_model("jd", K=K).JD
        assert len(jd.aspp.dilated[0].branches) == (1 if K == 0 else K + 1)
        assert len(jd.aspp.b0.branches) == len(jd.aspp.pool.branches) == max(K, 1)
    jd = tiny_model("jd", deployed=True).JD
    conv = jd.aspp.dilated[2].branches[0]
    assert isinstance(conv, torch.nn.Conv2d) and conv.bias is not None and conv.dilation == (3, 3)


@pytest.mark.parametrize("dataset,target", [("coco", 1.66e6), ("cityscapes", 4.92e6)])
def test_paper_jd_parameter_counts(dataset, target):
    """Deployed JD (incl. HD and entropy bottleneck) within 1% of Table 2's count; the
    deployed JD has the plain topology's conv weights plus one bias per fused sub-block."""
    cfg = {**preset(dataset), "decoder": "jd"}
    with torch.device("meta"):
        plain = build_model({**cfg, "K": 0})
        deployed = build_model({**cfg, "deployed": True})
    n_plain = count(plain.hyperprior, plain.JD)
    n_deployed = count(deployed.hyperprior, deployed.JD)
    assert abs(n_deployed - target) / target < 0.01
    assert abs(n_plain - target) / target < 0.01
    F = cfg["F"]
    assert n_deployed == n_plain - 5 * 2 * F + 5 * F  # 5 BNs (gamma, beta) -> 5 biases


def test_complexity_ratios_coco():
    """JD/(SD+D) params in 9..12.5 % and GMACs <= 3.5 % (Table 2); --json keys present, the
    learned codec's rows too."""
    c = complexity("coco")
    for key in ["edge_params", "edge_gmacs", "jd_params", "jd_gmacs", "jd_train_params",
                "ahuja_params", "ahuja_gmacs", "nocomp_params", "nocomp_gmacs"]:
        assert key in c
    assert isinstance(c["jd_params"], int) and isinstance(c["jd_gmacs"], float)
    assert 0.09 <= c["jd_params"] / c["ahuja_params"] <= 0.125
    assert c["jd_gmacs"] / c["ahuja_gmacs"] <= 0.035
    assert c["jd_train_params"] > c["jd_params"]
    # Fig. 1a's learned codec (our stand-in: scale hyperprior 192/320): its encoder at the edge,
    # its decoder before E and D in the cloud
    assert c["codec_edge_params"] == pytest.approx(8.31e6, rel=0.01)
    codec_decoder = c["codec_cloud_params"] - c["nocomp_params"] - count(E("resnet50"))  # h_s + g_s
    assert codec_decoder == pytest.approx(5.90e6, rel=0.01)
    assert c["codec_cloud_gmacs"] > c["nocomp_gmacs"] and c["codec_edge_gmacs"] > 0
    # Fig. 1b's JSDE: Tables 2 and 4's parameter counts within 1 %
    assert c["jsde_edge_params"] == pytest.approx(8.31e6, rel=0.01)
    assert c["jsde_cloud_params"] == pytest.approx(43.23e6, rel=0.01) and c["jsde_cloud_gmacs"] > 0


# -----------------------------------------------------------------------------
# rate model


def test_optimizer_split():
    """aux = exactly the EntropyBottleneck quantiles; main + aux = all, disjoint."""
    model = tiny_model("ahuja")
    main, aux = split_parameters(model)
    assert len(aux) == 1 and aux[0] is model.hyperprior.entropy_bottleneck.quantiles
    ids = [id(p) for p in main + aux]
    assert len(set(ids)) == len(ids) == len(list(model.parameters()))


def test_noise_in_training_rounding_in_eval():
    """Training adds U(-1/2, 1/2) to r; eval rounds it (Sec. 3.1)."""
    coder = HyperpriorCoder(HD(8), N=8)
    r, h = 3 * torch.randn(2, 8, 8, 8), torch.randn(2, 8, 2, 2)
    r_hat, p = coder(r, h)
    assert (r_hat - r).abs().max() <= 0.5 and not torch.equal(r_hat, torch.round(r))
    coder.eval()
    r_hat, p = coder(r, h)
    assert torch.equal(r_hat, torch.round(r))
    assert bits_per_pixel(p, 2 * 128 * 128) > 0


def test_entropy_models_stay_float32_under_autocast():
    """Under bf16 autocast the likelihoods are float32 and the rate is finite."""
    model = tiny_model("jd")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    assert all(p.dtype == torch.float32 for p in out["likelihoods"].values())
    assert torch.isfinite(bits_per_pixel(out["likelihoods"], 2 * 32 * 32))


# -----------------------------------------------------------------------------
# bitstreams


@pytest.fixture(scope="module")
def coded():
    """An eval-mode JD model with updated CDFs, a batch, and its byte strings."""
    model = tiny_model("jd").eval()
    model.hyperprior.update()
    x = torch.randn(2, 3, 70, 99)
    return model, x, model.compress(x)


def test_roundtrip_equals_eval_forward(coded):
    """The cloud's r^ equals the edge's rounded r, and the masks decoded from bytes equal
    the eval-mode forward's masks exactly, also with another thread count."""
    model, x, strings = coded
    r, _ = model.SE(model.E(x))
    r_hat, size = model.hyperprior.decompress(strings)
    assert size == (70, 99) and torch.equal(r_hat, torch.round(r))
    with torch.no_grad():
        ref = model(x)["logits"].argmax(1)
    assert torch.equal(model.decompress(strings).argmax(1), ref)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        r_hat1, _ = model.hyperprior.decompress(strings)
        masks1 = model.decompress(strings).argmax(1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(r_hat1, r_hat) and torch.equal(masks1, ref)


def test_ahuja_roundtrip():
    """The Ahuja baseline decodes the same container format to the eval forward's masks."""
    model = tiny_model("ahuja").eval()
    model.hyperprior.update()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        ref = model(x)["logits"].argmax(1)
    assert torch.equal(model.decompress(model.compress(x)).argmax(1), ref)


def test_checkpoint_reload_decodes(coded):
    """A fresh model that loads the state dict (CDF buffers resized) decodes the strings."""
    model, x, strings = coded
    fresh = tiny_model("jd", seed=1).eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.decompress(strings), model.decompress(strings))


def test_corrupt_strings_refused(coded):
    """Truncated, bit-flipped, extended, wrong-magic, wrong-version, version-1 and
    foreign-model strings raise ValueError naming the problem; so does a flip of any bit of
    sampled bytes."""
    model, x, strings = coded
    s = strings[0]
    cases = {
        "truncated": s[:8],
        "not a DSSJ": b"\x44" + s[1:],
        "version 7": b"\xd7" + s[1:],
        "version 2; this decoder reads version 3: re-encode": b"\xd2" + s[1:],
        "older bitstream format": b"DSSJ\x01" + s,
        "corrupted": s[:-5],  # cut in transit: the check value no longer matches
        "corrupted ": s + b"\x00",  # extended in transit
        "corrupted  ": s[:20] + bytes([s[20] ^ 0x10]) + s[21:],
    }
    for word, bad in cases.items():
        with pytest.raises(ValueError, match=word.strip()):
            model.decompress([bad])
    # a flip of any of the 8 bits of a sampled set of bytes (header and payload) is caught
    for i in sorted(set(range(0, len(s), 5)) | {len(s) - 1}):
        for bit in range(8):
            with pytest.raises(ValueError):
                model.decompress([s[:i] + bytes([s[i] ^ (1 << bit)]) + s[i + 1:]])
    other = tiny_model("jd", seed=3).eval()
    other.hyperprior.update()
    with pytest.raises(ValueError, match="another model"):
        other.decompress([s])


def test_rans_bytes_are_compressais(coded):
    """Our rANS calls (only the CDF rows a string uses go to the C++ coder) write exactly the
    bytes of CompressAI's own EntropyBottleneck.compress and GaussianConditional.compress, and
    our scale indexes are its build_indexes."""
    model, x, strings = coded
    hp = model.hyperprior
    with torch.no_grad():
        r, h = model.SE(model.E(x))
    medians = hp.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1)
    assert entropy.rans_encode(hp.entropy_bottleneck, torch.round(h - medians), hp._channel_indexes(h)) == \
        hp.entropy_bottleneck.compress(h)
    indexes = hp.gaussian_conditional.build_indexes(torch.rand_like(r) * 5)
    sigma = torch.cat([torch.rand(2000) * 300, hp.gaussian_conditional.scale_table, torch.tensor([0.0, 0.11, 1e9])])
    assert torch.equal(hp.scale_indexes(sigma), hp.gaussian_conditional.build_indexes(sigma))  # ours, bucketized
    assert entropy.rans_encode(hp.gaussian_conditional, torch.round(r), indexes) == \
        hp.gaussian_conditional.compress(r, indexes)


@pytest.mark.parametrize("hd", ["jd", "codec"])
def test_sigma_for_coding_is_hd_in_float64(hd):
    """The coder's float64 HD (transposed convs on channels-last inputs, the 3x3 conv as 9 matrix
    products, entropy.conv3x3_float64) is HD's plain float64 forward: within 1e-12, and the
    float32 sigma that the scale indexes come from is the same, at sizes down to 1 x 1."""
    from model import codec_HD
    torch.manual_seed(0)
    N, M, layers = (64, 64, HD(64)) if hd == "jd" else (16, 24, codec_HD(16, 24))
    hp = HyperpriorCoder(layers, N, M)
    weights = {n: t.double() for n, t in layers.state_dict().items()}
    for size in [(16, 32), (3, 5), (1, 1)]:
        h_hat = torch.round(3 * torch.randn(2, N, *size))
        x = torch.randn(2, N, *size, dtype=torch.float64)
        w, b = torch.randn(M, N, 3, 3, dtype=torch.float64), torch.randn(M, dtype=torch.float64)
        with torch.no_grad():
            assert (entropy.conv3x3_float64(x, w, b) - torch.conv2d(x, w, b, padding=1)).abs().max() <= 1e-12
            plain = torch.func.functional_call(layers, weights, (h_hat.double(),))[..., : 4 * size[0] - 1, :]
            sigma = hp._sigma_for_coding(h_hat, (4 * size[0] - 1, 4 * size[1]))  # cropped as r's size is
        assert sigma.dtype == torch.float32 and torch.equal(sigma, plain.float())


def test_header_v3(coded):
    """The version-3 header: format byte, model tag, H and W and len(b_h) as varints (b_r is
    one stream at this size), the check value; 9 or 10 bytes here; the latent sizes follow
    from the image size."""
    model, x, strings = coded
    model_id = model.hyperprior.model_id()
    fields = entropy.unpack(strings[0], model_id, model.hyperprior.M)
    assert fields["image_size"] == (70, 99) and len(fields["b_r"]) == 1
    header = len(strings[0]) - len(fields["b_h"]) - len(fields["b_r"][0])
    assert strings[0][0] == 0xD3 and strings[0][1] == model_id & 0xFF
    assert header == 2 + 1 + 1 + len(entropy.varint(len(fields["b_h"]))) + 4
    assert strings[0][2:4] == bytes([70, 99])  # one varint byte each below 128
    assert entropy.latent_size((70, 99)) == (5, 7) and entropy.hyper_size((70, 99)) == (2, 2)
    assert [entropy.r_streams(64, size) for size in [(512, 1024), (513, 1024), (1024, 2048)]] == [1, 2, 4]
    for n in (0, 1, 127, 128, 300, 16383, 2**21 - 1):
        assert entropy.read_varint(entropy.varint(n), 0, "n") == (n, len(entropy.varint(n)))


def test_b_r_streams(coded, monkeypatch):
    """b_r cut into k rANS streams (1024x2048 has 4 of 2^17 symbols; here 5 of at most 500):
    the header lists k - 1 lengths, and the masks equal those of one stream. Streams with
    their boundaries moved, one dropped, added or cut are refused even with a valid check
    value. (Swapped streams are refused or, where their CDF indexes agree, decoded: a valid
    string of another latent, as any string a sender with the model id can forge.)"""
    model, x, strings = coded
    hp = model.hyperprior
    one_stream = model.decompress(strings)
    monkeypatch.setattr(entropy, "STREAM_SYMBOLS", 500)
    k = entropy.r_streams(hp.M, (70, 99))  # 64 * 5 * 7 = 2240 symbols
    cut = model.compress(x)
    assert k == 5 and torch.equal(model.decompress(cut), one_stream)
    with pytest.raises(ValueError, match="corrupted"):  # k follows from M and the size: not sent
        model.decompress(strings)
    mid = hp.model_id()
    f = entropy.unpack(cut[0], mid, hp.M)
    assert len(f["b_r"]) == k and all(len(b) >= 8 and len(b) % 4 == 0 for b in f["b_r"])
    header = len(cut[0]) - len(f["b_h"]) - sum(map(len, f["b_r"]))
    assert header == 2 + 2 + sum(len(entropy.varint(len(b))) for b in [f["b_h"], *f["b_r"][:-1]]) + 4
    b_r = f["b_r"]
    moved = [b_r[0] + b_r[1][:4], b_r[1][4:], *b_r[2:]]
    for bad in [moved, b_r[:-1], b_r + [b_r[-1]], [b_r[0][:-4], *b_r[1:]]]:
        with pytest.raises(ValueError):
            model.decompress([entropy.pack(f["b_h"], bad, (70, 99), mid)])


# hostile input: every byte string is decoded or refused with a ValueError, never a crash

FUZZ = r"""
import random, sys, time, torch
import entropy
from model import DistributedSegmenter
torch.manual_seed(0)
torch.set_num_threads(1)
entropy.STREAM_SYMBOLS = 64  # b_r in 3 rANS streams at 64x96, so that their boundaries are fuzzed too
model = DistributedSegmenter("jd", 5, 64, 1, "resnet18-l2", N=8, dilations=(1, 2, 3)).eval()
model.hyperprior.update()
mid = model.hyperprior.model_id()
x = torch.randn(2, 3, 64, 96)
valid = model.compress(x)
fields = [entropy.unpack(s, mid, 8) for s in valid]
assert all(len(f["b_r"]) == 3 for f in fields)
rng = random.Random(0)
def rand(n):
    return bytes(rng.getrandbits(8) for _ in range(n))
def forge(b_h, b_r, size=(64, 96)):  # a container whose check value is right for this model
    return entropy.pack(b_h, b_r, size, mid)
def mutations():
    for _ in range(250):
        f = rng.choice(fields)
        b_h, b_r = f["b_h"], list(f["b_r"])
        j = rng.randrange(len(b_r))
        cuts = [0] + [len(b_h + b"".join(b_r[:c + 1])) for c in range(len(b_r))]
        cuts[1 + rng.randrange(len(b_r))] += rng.randrange(-24, 25)
        b = b_h + b"".join(b_r)
        parts = [b[a:c] for a, c in zip(cuts[:-1], cuts[1:])]
        yield forge(parts[0], parts[1:])  # a stream boundary shifted
        streams = [b_h, *b_r]
        rng.shuffle(streams)
        yield forge(streams[0], streams[1:])  # streams swapped
        yield forge(rng.choice([b"", b_h]), [rng.choice([b"", s[:rng.randrange(12)]]) for s in b_r])  # empty, short
        yield forge(b_h, b_r, (rng.randrange(1, 300), rng.randrange(1, 300)))  # other sizes (and stream counts)
        yield forge(b_h, b_r, rng.choice([(65535, 65535), (4096, 4096), (1, 2**20), (0, 96)]))
        yield forge(rand(rng.randrange(0, 16)), [rand(rng.randrange(0, 16)) for s in b_r])  # short random payloads
        yield forge(b_h, b_r[:j] + [rand(4 * rng.randrange(2, 300))] + b_r[j + 1:])  # a random stream after a valid b_h
        yield forge(rand(4 * rng.randrange(2, 40)), [rand(4 * rng.randrange(2, 300)) for s in b_r])
        yield forge(b_h, b_r[:j] + [b_r[j][:-4 * rng.randrange(1, 4)]] + b_r[j + 1:])  # cut short, check fixed
        s = bytearray(b_r[j])
        s[rng.randrange(len(s))] ^= 1 << rng.randrange(8)
        yield forge(b_h, b_r[:j] + [bytes(s)] + b_r[j + 1:])  # a flipped bit, check fixed
        yield rand(rng.randrange(0, 64))  # noise
n = decoded = 0
t0 = time.time()
for s in mutations():
    try:
        out = model.decompress([s])
        size = entropy.unpack(s, mid, 8)["image_size"]
        assert out.shape == (1, 5, *size), out.shape
        decoded += 1
    except ValueError:
        pass
    n += 1
print(f"{n} strings, {decoded} decoded, {n - decoded} refused, {time.time() - t0:.1f} s")
"""


def test_fuzz_decompress_never_crashes():
    """2750 structured mutations of strings with 3 b_r streams, the check value recomputed
    (stream boundaries shifted, streams swapped, empty and short payloads, other and huge
    sizes, random streams after a valid header, cut streams, flipped bits) and noise: each
    is decoded to masks of its declared size or refused with a ValueError. In a subprocess,
    so that a crash of the C++ decoder fails the test."""
    proc = subprocess.run([sys.executable, "-c", FUZZ], cwd=HERE, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    n, decoded = map(int, re.search(r"(\d+) strings, (\d+) decoded", proc.stdout).groups())
    assert n == 2750 and decoded < n


def test_bomb_refused_before_decoding(coded):
    """A small string declaring a 65535x65535 image (or anything over MAX_IMAGE_PIXELS) is
    refused from its header, with a valid check value and real payloads."""
    model, x, strings = coded
    mid = model.hyperprior.model_id()
    f = entropy.unpack(strings[0], mid, model.hyperprior.M)
    for size in [(65535, 65535), (4096, 4096)]:
        with pytest.raises(ValueError, match="declares a"):
            model.decompress([entropy.pack(f["b_h"], f["b_r"], size, mid)])
    limit = entropy.MAX_IMAGE_PIXELS
    try:
        entropy.MAX_IMAGE_PIXELS = 70 * 98
        with pytest.raises(ValueError, match="1 to 6860 pixels"):
            model.decompress(strings[:1])
    finally:
        entropy.MAX_IMAGE_PIXELS = limit


def test_payload_lengths_refused(coded):
    """A header with a valid check value and empty, not whole-word or overlong payloads is
    refused before the C++ decoder could read past them (or their zero padding could grow
    with them)."""
    model, x, strings = coded
    mid = model.hyperprior.model_id()
    f = entropy.unpack(strings[0], mid, model.hyperprior.M)
    r0 = f["b_r"][0]
    for b_h, b_r in [(b"", b""), (f["b_h"], b""), (b"", r0), (f["b_h"], r0[:-3])]:
        s = entropy.pack(b_h, [b_r], (70, 99), mid)
        with pytest.raises(ValueError, match="cannot be an rANS stream"):
            model.decompress([s])
    assert len(entropy.pack(b"", [b""], (70, 99), mid)) == 9
    n_h, n_r = 64 * 2 * 2, 64 * 5 * 7  # symbols of h^ and r^ at 70x99
    for b_h, b_r in [(bytes(4 * n_h + 4), r0), (f["b_h"], r0 + bytes(4 * n_r + 4 - len(r0)))]:
        with pytest.raises(ValueError, match="longer than any rANS stream"):
            model.decompress([entropy.pack(b_h, [b_r], (70, 99), mid)])


ENCODER_OVERFLOW = r"""
import torch
from model import DistributedSegmenter
torch.manual_seed(0)
model = DistributedSegmenter("jd", 5, 64, 1, "resnet18-l2", dilations=(1, 2, 3)).eval()
model.hyperprior.update()
r, h = torch.randn(1, 64, 4, 6), torch.randn(1, 64, 1, 2)
for name, (r_, h_) in {"h": (r, h * 1.4e9), "r": (r * 2e8, h), "r mean": (r.sign() * 3000, h)}.items():
    try:
        model.hyperprior.compress(r_, h_, (64, 96))
        print(name, "coded")
    except ValueError as e:
        print(name, "refused:", e)
"""


def test_encoder_refuses_latents_it_cannot_code():
    """Latents of an untrained or diverged model (|h| up to 1.4e9, |r| up to 2e8, or every
    |r| = 3000, which would overrun the encoder's buffer) are refused with a ValueError,
    instead of CompressAI's encoder looping forever or writing past its buffer. In a
    subprocess with a time limit, since the failure mode is a hang."""
    proc = subprocess.run([sys.executable, "-c", ENCODER_OVERFLOW], cwd=HERE, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
    for name in ("h", "r", "r mean"):
        assert re.search(rf"^{name} refused: cannot code .* untrained or diverged", proc.stdout, re.M), proc.stdout


def test_real_bits_match_likelihood_bits():
    """After a few hundred rate-only steps on random features, the real payload bits are
    within 10 % of -sum log2 p in eval mode."""
    torch.manual_seed(0)
    N = 16
    h_a = SE(8, N).h_a
    coder = HyperpriorCoder(HD(N), N)
    # random features whose scale varies smoothly in space: the hyperprior has work to do
    scale = torch.nn.functional.interpolate(torch.rand(4, N, 4, 4) * 4 + 0.5, size=(16, 16))
    r = torch.randn(4, N, 16, 16) * scale
    main, aux = split_parameters(torch.nn.ModuleList([h_a, coder]))
    opt, opt_aux = torch.optim.Adam(main, 1e-2), torch.optim.Adam(aux, 1e-1)
    for _ in range(300):
        _, p = coder(r, h_a(r.abs()))
        loss = bits_per_pixel(p, 4 * 64 * 64)
        opt.zero_grad()
        loss.backward()
        opt.step()
        aux_loss = coder.aux_loss()
        opt_aux.zero_grad()
        aux_loss.backward()
        opt_aux.step()
    coder.eval()
    coder.update()
    with torch.no_grad():
        h = h_a(r.abs())
        _, p = coder(r, h)
        est_bits = bits_per_pixel(p, 1).item()  # Eq. (1) times the pixels: bits
        strings = coder.compress(r, h, (256, 256))
    model_id = coder.model_id()
    fields = [entropy.unpack(s, model_id, coder.M) for s in strings]
    real_bits = 8 * sum(len(f["b_h"]) + sum(map(len, f["b_r"])) for f in fields)
    assert abs(real_bits / est_bits - 1) < 0.10, (real_bits, est_bits)


# -----------------------------------------------------------------------------
# data and training

QUICK = ["--max-iters", "4", "--batch-size", "2", "--eval-interval", "2", "--log-interval", "1",
         "--val-limit", "4", "--F", "64", "--K", "1"]


def run_script(script, *argv, check=True):
    """A script of the project run as a user runs it, but in this process, whose imports are
    loaded already (a new interpreter spends seconds importing torch): returns an object with
    .returncode and .stdout (stdout and stderr together, with the message of a sys.exit)."""
    out, argv0, code = io.StringIO(), sys.argv, 0
    try:
        sys.argv = [script, *argv]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(os.path.join(HERE, script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            out.write(e.code + "\n")
    finally:
        sys.argv = argv0
    proc = types.SimpleNamespace(returncode=code, stdout=out.getvalue())
    if check:
        assert proc.returncode == 0, proc.stdout
    return proc


def run_train(*argv, check=True):
    return run_script("train.py", *argv, check=check)


def logged_losses(text):
    return {int(i): loss for i, loss in re.findall(r"iter (\d+): loss (\S+),", text)}


def test_synthetic_deterministic_and_complete():
    """Image i of a split is the same for every instance; train and val differ; labels are
    0..7 and, over a few scenes, cover every class."""
    a, b = SyntheticStreets("train"), SyntheticStreets("train")
    x, y = a[5]
    assert torch.equal(x, b[5][0]) and torch.equal(y, b[5][1]) and torch.equal(y, a[(5, 3)][1])
    assert not torch.equal(x, SyntheticStreets("val")[5][0])
    assert x.shape == (3, 128, 256) and y.dtype == torch.int64
    seen = torch.cat([a[i][1].flatten() for i in range(20)]).unique().tolist()
    assert seen == list(range(len(SYNTHETIC_CLASSES)))


@pytest.mark.parametrize("decoder", ["jd", "ahuja", "none"])
def test_train_runs(decoder, tmp_path):
    """A few iterations of train.py per decoder end with a real-bitstream evaluation and a
    checkpoint that rebuilds the model, and the synthetic scenes at the run's --size."""
    out = run_train(*QUICK, "--decoder", decoder, "--size", "64", "96", "--out-dir", str(tmp_path)).stdout
    assert "final val (4 images): mIoU" in out
    assert ("bpp (real bytes)" in out) == (decoder != "none")
    model, ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 4 and model.decoder == decoder
    assert val_dataset(ckpt["args"], limit=1)[0][0][0].shape == (3, 64, 96)


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    """A run killed mid-way and resumed from its last checkpoint logs the same losses as an
    uninterrupted run (CPU, fixed seed)."""
    argv = [*QUICK, "--max-iters", "30", "--eval-interval", "3"]
    full = logged_losses(run_train(*argv, "--out-dir", str(tmp_path / "a")).stdout)
    proc = subprocess.Popen([sys.executable, "train.py", *argv, "--out-dir", str(tmp_path / "b")],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "checkpoint saved" in line:
            proc.send_signal(signal.SIGKILL)  # a crash right after the first checkpoint
            break
    proc.wait()
    ckpt = str(tmp_path / "b" / "ckpt.pt")
    start = torch.load(ckpt)["iter_num"]
    assert 3 <= start < 30
    resumed = logged_losses(run_train("--resume", ckpt).stdout)
    assert min(resumed) == start + 1 and max(resumed) == 30
    assert all(resumed[i] == full[i] for i in resumed), (resumed, full)


def test_resume_refuses_other_model_settings(tmp_path):
    """Resuming with another model setting stops with a message naming the setting."""
    run_train(*QUICK, "--max-iters", "2", "--out-dir", str(tmp_path))
    proc = run_train("--resume", str(tmp_path / "ckpt.pt"), "--K", "3", check=False)
    assert proc.returncode != 0 and "--K 3 (checkpoint: 1)" in proc.stdout
    proc = run_train("--resume", str(tmp_path / "ckpt.pt"), "--size", "64", "64", check=False)
    assert proc.returncode != 0 and "--size [64, 64] (checkpoint: [128, 256])" in proc.stdout


def test_edge_from_trains_only_the_cloud(ckpts, tmp_path):
    """--edge-from: a new cloud decoder learns on another checkpoint's frozen edge. The edge's
    tensors are unchanged, its bitstreams byte-identical and decodable by the new decoder, only
    the decoder's parameters are optimized, and the rate point (alpha) is the source's. A No
    Compression source is refused."""
    run_train(*QUICK, "--max-iters", "2", "--size", "64", "96", "--edge-from", ckpts["ahuja"],
              "--out-dir", str(tmp_path))
    src, _ = load_checkpoint(ckpts["ahuja"])
    new, ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert new.decoder == "jd" and ckpt["args"]["alpha"] == 0.5 and ckpt["aux_optimizer"] is None
    for name in ("E", "SE", "hyperprior"):
        a, b = getattr(src, name).state_dict(), getattr(new, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert len(ckpt["optimizer"]["state"]) == sum(1 for _ in new.JD.parameters())
    x = SyntheticStreets("val", size=(64, 96))[0][0][None]
    strings = src.compress(x)
    assert new.compress(x) == strings
    assert new.decompress(strings).shape == (1, len(SYNTHETIC_CLASSES), 64, 96)
    proc = run_train(*QUICK, "--edge-from", ckpts["none"], "--out-dir", str(tmp_path / "n"), check=False)
    assert proc.returncode != 0 and "has no edge codec" in proc.stdout


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    """A NaN in the weights makes the loss non-finite: training stops with a message and the
    last good checkpoint is left byte for byte as it was."""
    run_train(*QUICK, "--max-iters", "2", "--out-dir", str(tmp_path))
    path = str(tmp_path / "ckpt.pt")
    ckpt = torch.load(path)
    ckpt["args"]["max_iters"] = 6
    del ckpt["args"]["size"]  # as saved before --size existed: the default size is used
    ckpt["model"]["JD.classifier.weight"][0, 0] = float("nan")
    save_checkpoint(ckpt, path)
    before = open(path, "rb").read()
    proc = run_train("--resume", path, check=False)
    assert proc.returncode == 1 and "non-finite loss at iteration 2" in proc.stdout
    assert open(path, "rb").read() == before


def test_torchrun_two_processes(tmp_path):
    """torchrun --nproc_per_node 2 (DDP over gloo on CPU) trains and evaluates; validation
    counts each image once."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *QUICK, "--batch-size", "4", "--val-limit", "5",
                           "--out-dir", str(tmp_path)], cwd=HERE, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert "2 process(es)" in proc.stdout and "final val (5 images)" in proc.stdout


# -----------------------------------------------------------------------------
# re-parameterization


def randomize_bn(model, seed=0):
    """Random BN statistics and affine parameters: default ones would hide fusion bugs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize("K", [1, 2, 3])
def test_fusion_is_exact(K):
    """Fused vs unfused logits in eval mode: max |diff| <= 1e-10 in float64, <= 1e-4 in
    float32; the deployed JD has the plain (K=0) conv weights plus one bias per sub-block."""
    model = tiny_model("jd", K=K)
    randomize_bn(model, seed=K)
    model.eval()
    x = torch.randn(2, 3, 40, 72)
    with torch.no_grad():
        deployed = reparameterize(model)
        assert (model(x)["logits"] - deployed(x)["logits"]).abs().max() <= 1e-4
        # float64: JD alone (the entropy models always run in float32)
        jd64, r_hat = model.JD.double(), torch.round(3 * torch.randn(2, 64, 3, 5, dtype=torch.float64))
        deployed64 = reparameterize(model).JD
        assert (jd64(r_hat, (40, 72)) - deployed64(r_hat, (40, 72))).abs().max() <= 1e-10
    plain = tiny_model("jd", K=0)
    assert count(deployed.JD) == count(plain.JD) - 5 * 2 * 64 + 5 * 64
    assert count(deployed.JD) == count(tiny_model("jd", deployed=True).JD)
    assert count(deployed.hyperprior) == count(model.hyperprior)


def test_fusion_refuses_training_mode_and_twice():
    """Fusing a model in training mode, fusing twice, or fusing a baseline is refused."""
    model = tiny_model("jd")
    with pytest.raises(ValueError, match="eval"):
        reparameterize(model)
    deployed = reparameterize(model.eval())
    with pytest.raises(ValueError, match="already deployed"):
        reparameterize(deployed)
    with pytest.raises(ValueError, match="ahuja"):
        reparameterize(tiny_model("ahuja").eval())


def test_deployed_checkpoint_decodes_same_bitstreams(tmp_path):
    """A deployed checkpoint rebuilt from disk decodes the K-branch model's bitstreams to the
    same masks; the edge (and so every byte) is unchanged."""
    model = tiny_model("jd", K=3)
    randomize_bn(model)
    model.eval()
    model.hyperprior.update()
    args = dict(decoder="jd", num_classes=5, F=64, K=3, encoder="resnet18-l2", dilations=[1, 2, 3],
                head="torchvision")
    deployed = reparameterize(model)
    save_checkpoint({"model": deployed.state_dict(), "args": {**args, "deployed": True}},
                    str(tmp_path / "deployed.pt"))
    loaded, _ = load_checkpoint(str(tmp_path / "deployed.pt"))
    x = torch.randn(2, 3, 64, 80)
    strings = model.compress(x)
    assert loaded.compress(x) == strings
    assert torch.equal(loaded.decompress(strings).argmax(1), model.decompress(strings).argmax(1))
    assert torch.equal(speed_up(loaded).decompress(strings).argmax(1), model.decompress(strings).argmax(1))


@pytest.mark.parametrize("size", [(64, 96), (72, 104), (70, 99)])
def test_fast_cloud_equals_eval_forward(size):
    """The deployed cloud's faster forwards (reparam.speed_up: pooled branch as a bias,
    DWUpConv and classifier as one sub-pixel conv; masks via amax, upsampled in strips) give
    the masks of the plain eval forward of the K-branch model, from its forward and from the
    bytes (segment), with logits within 1e-4 (1e-10 in float64: the same function). Strips
    run where H = 8h (64, 72: h = 8, 9), one interpolation elsewhere (70)."""
    model = tiny_model("jd", K=3)
    randomize_bn(model)
    model.eval()
    model.hyperprior.update()
    deployed = speed_up(reparameterize(model))
    assert type(deployed.JD).__name__ == "FoldedTailJD" and type(deployed.JD.aspp).__name__ == "PooledBiasASPP"
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        plain = model(x)["logits"]
        fast = deployed(x)["logits"]
        assert (plain - fast).abs().max() <= 1e-4
        assert torch.equal(masks(fast), plain.argmax(1))
        assert torch.equal(masks(deployed.decompress(model.compress(x))), plain.argmax(1))
        assert torch.equal(deployed.segment(model.compress(x)), plain.argmax(1))
        low = deployed.cloud_head(deployed.hyperprior(*deployed.edge(x))[0], size, upsample=False)
        for rows in (1, 2, 3):
            assert torch.equal(upsampled_masks(low, size, rows), plain.argmax(1))
        r_hat = torch.round(3 * torch.randn(2, 64, -(-size[0] // 16), -(-size[1] // 16), dtype=torch.float64))
        model64 = copy.deepcopy(model)
        model64.JD.double()
        fast64 = speed_up(reparameterize(model64)).JD
        assert (model64.JD(r_hat, size) - fast64(r_hat, size)).abs().max() <= 1e-10
    ties = torch.randint(0, 3, (2, 5, 30, 40)).float()  # many exact ties: the first maximum wins in both
    assert torch.equal(masks(ties), ties.argmax(1))
    odd = torch.randn(2, 5, 30, 40)  # a NaN logit (the pixel's class is the NaN's, as in max) and infinities
    odd[0, 2, 3, 4], odd[1, :, 5, 6], odd[1, 3:, 7, 8] = float("nan"), float("-inf"), float("inf")
    assert torch.equal(masks(odd), odd.max(1).indices) and torch.equal(masks(odd[:1, :, 4:]), odd[:1, :, 4:].argmax(1))
    up = interpolate(ties, (240, 320), mode="bilinear", align_corners=False)  # ties after upsampling too
    assert all(torch.equal(upsampled_masks(ties, (240, 320), rows), up.argmax(1)) for rows in (1, 4, 7, 30))


# -----------------------------------------------------------------------------
# evaluation


def write_tiny_ckpt(path, decoder, seed=0):
    """A small untrained checkpoint on the synthetic data, as train.py would save it."""
    cfg = dict(dataset="synthetic", decoder=decoder, num_classes=len(SYNTHETIC_CLASSES), F=64, K=1,
               encoder="resnet18-l2", dilations=[1, 2, 3], head="torchvision", alpha=0.5, seed=0)
    torch.manual_seed(seed)
    model = DistributedSegmenter(decoder, len(SYNTHETIC_CLASSES), 64, 1, "resnet18-l2", dilations=(1, 2, 3))
    if decoder != "none":
        model.hyperprior.update()
    save_checkpoint({"model": model.state_dict(), "args": cfg, "iter_num": 0}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return {dec: write_tiny_ckpt(d / f"{dec}.pt", dec) for dec in ("jd", "ahuja", "none")}


def test_evaluate_cli_json(ckpts, tmp_path):
    """--ckpt --json reports mIoU in [0, 1] and per-class IoU; its real bpp is exactly the bytes
    that --save-bitstreams writes for the same images, over their pixels; its likelihood bpp
    is Eq. (1) of the eval forward."""
    out = tmp_path / "m.json"
    evaluate_main(get_args_parser().parse_args(["--ckpt", ckpts["jd"], "--limit", "3", "--json", str(out)]))
    m = json.load(open(out))
    assert m["n_images"] == 3 and 0 <= m["miou"] <= 1 and len(m["iou"]) == len(SYNTHETIC_CLASSES)
    evaluate_main(get_args_parser().parse_args(["--ckpt", ckpts["jd"], "--limit", "3",
                                                "--save-bitstreams", str(tmp_path / "bits")]))
    nbytes = sum(f.stat().st_size for f in (tmp_path / "bits").iterdir())
    assert m["bpp_real"] == pytest.approx(8 * nbytes / (3 * 128 * 256), rel=1e-12)
    model, ckpt = load_checkpoint(ckpts["jd"])
    x = torch.stack([val_dataset(ckpt["args"], limit=3)[0][i][0] for i in range(3)])
    with torch.no_grad():
        assert m["bpp_est"] == pytest.approx(bits_per_pixel(model(x)["likelihoods"], x.numel() / 3).item(), rel=1e-5)


class Exploit:
    """Unpickling this would create a file: what a crafted checkpoint can do without weights_only."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoints_load_safely(ckpts, tmp_path):
    """A real checkpoint loads with weights_only=True; empty, truncated, text, plain-state-dict
    and code-carrying files are refused with one clear line naming the file, and the code in
    a crafted file never runs, also through the command-line tools."""
    from model import read_checkpoint
    assert read_checkpoint(ckpts["jd"])["args"]["decoder"] == "jd"
    data = open(ckpts["jd"], "rb").read()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save(tiny_model("jd").state_dict(), tmp_path / "plain.pt")
    torch.save({"model": Exploit(str(tmp_path / "pwned")), "args": {}}, tmp_path / "evil.pt")
    for name, message in [("empty", "not a readable"), ("cut", "not a readable"), ("text", "not a readable"),
                          ("plain", "a plain state dict, not a checkpoint"), ("evil", "not a readable")]:
        path = str(tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=message) as e:
            load_checkpoint(path)
        assert path in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()
    for argv in (["evaluate.py", "--ckpt"], ["reparam.py", "--out", str(tmp_path / "d.pt"), "--ckpt"]):
        proc = run_script(*argv, str(tmp_path / "evil.pt"), check=False)
        assert proc.returncode != 0 and proc.stdout.startswith("error: ") and "Traceback" not in proc.stdout
    proc = run_train("--resume", str(tmp_path / "cut.pt"), check=False)
    assert proc.returncode != 0 and "--resume:" in proc.stdout and "Traceback" not in proc.stdout
    assert not (tmp_path / "pwned").exists()


def test_cli_refuses_bad_settings(tmp_path):
    """alpha outside (0, 1], K < 0, negative iterations and an out-dir that cannot be written
    each stop train.py with one line (SystemExit with a message, not a traceback), before
    any training."""
    (tmp_path / "file").write_text("")
    for argv, message in [(["--alpha", "-1"], "--alpha -1.0: must be in (0, 1]"),
                          (["--alpha", "2"], "--alpha 2.0: must be in (0, 1]"),
                          (["--K", "-1"], "--K -1:"), (["--max-iters", "-5"], "--max-iters -5:"),
                          (["--out-dir", str(tmp_path / "file" / "sub")], "cannot write there")]:
        proc = run_train(*argv, "--val-limit", "2", "--F", "64", check=False)
        assert proc.returncode == 1 and message in proc.stdout and "iter 1:" not in proc.stdout, proc.stdout


def test_miou_known_value():
    """A hand-made confusion: label 255 is ignored, IoU = TP / (TP + FP + FN), absent classes
    drop out of the mean."""
    target = torch.tensor([0, 0, 1, 1, 255, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    cm = confusion_matrix(pred, target, 3)
    assert cm.sum() == 4
    miou, per_class = iou(cm)
    assert per_class[0] == pytest.approx(1 / 2) and per_class[1] == pytest.approx(2 / 3)
    assert np.isnan(per_class[2]) and miou == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_bitstreams_on_disk(ckpts, tmp_path, monkeypatch):
    """The edge writes one file per image; the cloud decodes them to the in-process masks;
    corrupt, foreign, misnamed and oversized files are refused by name and counted;
    evaluate.py exits non-zero when no file decodes."""
    model, ckpt = load_checkpoint(ckpts["jd"])
    ds, _ = val_dataset(ckpt["args"], limit=4)
    n, total = save_bitstreams(model, ds, str(tmp_path), "cpu")
    files = sorted(os.listdir(tmp_path))
    assert n == 4 and files[0] == "val_00000.dssj" and total == sum(os.path.getsize(tmp_path / f) for f in files)
    m, masks = from_bitstreams(model, ds, str(tmp_path), "cpu", return_masks=True)
    assert m["n_images"] == 4 and m["n_refused"] == 0
    with torch.no_grad():
        for i in range(4):
            ref = model(ds[i][0][None])["logits"].argmax(1)[0]
            assert torch.equal(masks[f"val_{i:05d}.dssj"], ref)
    data = (tmp_path / "val_00001.dssj").read_bytes()
    (tmp_path / "val_00001.dssj").write_bytes(data[:-3])  # truncated in transit
    (tmp_path / "val_00002.dssj").write_bytes(b"\x89PNG" + data[4:])  # a foreign file
    (tmp_path / "notes.txt").write_text("hello")
    write_tiny_ckpt(tmp_path.parent / "other.pt", "jd", seed=7)
    other, _ = load_checkpoint(str(tmp_path.parent / "other.pt"))
    m = from_bitstreams(model, ds, str(tmp_path), "cpu")
    assert m["n_images"] == 2 and m["n_refused"] == 3
    assert {name for name, _ in m["refused"]} == {"val_00001.dssj", "val_00002.dssj", "notes.txt"}
    assert from_bitstreams(other, ds, str(tmp_path), "cpu")["n_images"] == 0  # another model's files
    monkeypatch.setattr(entropy, "MAX_IMAGE_PIXELS", 16 * 16)  # 1x256: 16 positions of r^, 4 of h^
    assert entropy.max_container_bytes(64, 64) == 4 * (64 * 16 + 64 * 4) + 2 + 3 * 4 + 4
    cap = entropy.max_container_bytes(model.hyperprior.N, model.hyperprior.M)
    (tmp_path / "val_00003.dssj").write_bytes(bytes(cap + 1))
    refused = dict(from_bitstreams(model, ds, str(tmp_path), "cpu")["refused"])
    assert "larger than any bitstream" in refused["val_00003.dssj"]  # refused before it is read
    proc = run_script("evaluate.py", "--ckpt", str(tmp_path.parent / "other.pt"), "--from-bitstreams",
                      str(tmp_path), check=False)
    assert proc.returncode != 0 and "error: no bitstream in" in proc.stdout  # none decodes: exit non-zero


def test_codec_rates(ckpts):
    """A conventional pipeline's bpp grows with the quality (JPEG: at quality 95 several times
    that of quality 5); mIoU stays in [0, 1]."""
    model, ckpt = load_checkpoint(ckpts["none"])
    ds, _ = val_dataset(ckpt["args"], limit=2)
    rows = codec_rd(model, ds, "cpu", "jpeg", qualities=[5, 30, 95])
    bpp = [r["bpp_real"] for r in rows]
    assert bpp[0] < bpp[1] < bpp[2] and bpp[2] > 3 * bpp[0]
    assert all(0 <= r["miou"] <= 1 for r in rows)
    webp = [r["bpp_real"] for r in codec_rd(model, ds, "cpu", "webp", qualities=[5, 90])]
    assert webp[0] < webp[1]


@pytest.mark.parametrize("codec", ["jpeg", "webp", "avif", "hevc"])
def test_image_codec_bytes_and_size(codec):
    """Each codec's bytes are those of the file Pillow writes, and the decoded image has the
    input's size; HEVC only where pillow-heif is installed (optional)."""
    if codec == "hevc":
        pytest.importorskip("pillow_heif")
    if codec == "avif" and not PIL.features.check("avif"):
        pytest.skip("this Pillow has no AVIF")
    image = (np.random.RandomState(0).rand(40, 72, 3) * 255).astype(np.uint8)
    decoded, n_bytes = code_image(image, codec, 50)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, image_codec_format(codec), quality=50)
    assert n_bytes == len(buf.getvalue()) and decoded.shape == image.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(float) - image).mean() < 60  # an image of the input, not noise


def test_missing_pillow_heif_message(monkeypatch):
    """Without pillow-heif, HEVC is refused with one line that names the package to install,
    in evaluate.py and in train.py, before any work."""
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import pillow_heif now raises ImportError
    with pytest.raises(ValueError, match="pip install pillow-heif"):
        image_codec_format("hevc")
    proc = run_script("evaluate.py", "--rd", "x.pt", "--image-codecs", "jpeg,hevc", check=False)
    assert proc.returncode != 0 and "pip install pillow-heif" in proc.stdout and "Traceback" not in proc.stdout
    proc = run_train("--decoder", "none", "--image-codec", "hevc", check=False)
    assert proc.returncode != 0 and "pip install pillow-heif" in proc.stdout


def test_finetune_on_decoded_images(ckpts, tmp_path):
    """Fig. 1a's protocol: a No-Compression checkpoint (E and D) fine-tuned on WebP-decoded
    images for 2 iterations; --rd then scores it on its own codec only, as "webp-ft"."""
    out = tmp_path / "ft"
    proc = run_train("--decoder", "none", "--image-codec", "webp", "--encoder-weights", ckpts["none"], "--F", "64",
                     "--K", "1", "--encoder", "resnet18-l2", "--dilations", "1", "2", "3", "--max-iters", "2",
                     "--eval-interval", "2", "--val-limit", "2", "--batch-size", "2", "--out-dir", str(out))
    assert "E and D initialized from" in proc.stdout
    model, ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["args"]["image_codec"] == "webp" and ckpt["iter_num"] == 2
    rows = rd_points([str(out / "ckpt.pt")], "cpu", limit=2, codecs=("jpeg", "webp"), qualities=[20])
    assert [(r["method"], r["system"], r["finetuned"]) for r in rows] == [("webp-ft", "webp", True)]
    proc = run_train("--decoder", "jd", "--image-codec", "webp", check=False)
    assert proc.returncode != 0 and "--decoder none" in proc.stdout


# -----------------------------------------------------------------------------
# the image-codec systems (Fig. 1a's learned codec, Fig. 1b's JSDE) and the attacker

TINY_CODEC = ["--codec-N", "16", "--codec-M", "24"]


def test_jsde_roundtrip_through_bitstreams(tmp_path, monkeypatch):
    """A tiny JSDE: y (M, H/16) and z (N, H/64) coded in the container; the cloud's y^ is the
    rounded y and its masks, from the bytes alone and from files, equal the eval forward's.
    b_r's streams are counted on y's M channels."""
    model = tiny_model("jsde", codec_N=16, codec_M=24).eval()
    model.hyperprior.update()
    x = torch.randn(2, 3, 70, 99)
    with torch.no_grad():
        out = model(x)
    assert out["logits"].shape == (2, 5, 70, 99)
    assert out["likelihoods"]["r"].shape == (2, 24, 5, 7) and out["likelihoods"]["h"].shape == (2, 16, 2, 2)
    strings = model.compress(x)
    y_hat, size = model.hyperprior.decompress(strings)
    assert size == (70, 99) and torch.equal(y_hat, torch.round(model.edge(x)[0]))
    assert torch.equal(masks(model.decompress(strings)), masks(out["logits"]))
    for i, s in enumerate(strings):
        (tmp_path / f"{i}.dssj").write_bytes(s)
    from_files = [(tmp_path / f"{i}.dssj").read_bytes() for i in range(2)]
    assert torch.equal(model.decompress(from_files), model.decompress(strings))
    monkeypatch.setattr(entropy, "STREAM_SYMBOLS", 100)  # 24 * 5 * 7 = 840 symbols: 9 streams (N's 16: 6)
    cut = model.compress(x)
    assert len(entropy.unpack(cut[0], model.hyperprior.model_id(), 24)["b_r"]) == 9
    assert torch.equal(model.hyperprior.decompress(cut)[0], y_hat)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="another model"):
        tiny_model("jd").eval().decompress(strings[:1])
    from compressai.models import ScaleHyperprior  # a CompressAI codec's state dict starts a JSDE
    codec = ScaleHyperprior(16, 24)
    torch.save(codec.state_dict(), tmp_path / "codec.pth.tar")
    load_codec_weights(model, str(tmp_path / "codec.pth.tar"))
    assert torch.equal(model.SE.g_a[0].weight, codec.g_a[0].weight) and torch.equal(model.hyperprior.HD[0].weight,
                                                                                    codec.h_s[0].weight)
    with pytest.raises(ValueError, match="another size"):
        load_codec_weights(tiny_model("jsde", codec_N=16, codec_M=32), str(tmp_path / "codec.pth.tar"))


@pytest.mark.parametrize("dataset,cloud", [("coco", 43.23e6), ("cityscapes", 69.32e6)])
def test_jsde_paper_parameter_counts(dataset, cloud):
    """Tables 2 and 4's JSDE: edge (the codec's g_a, h_a, h_s, entropy models) 8.31 M, cloud
    (entropy models, h_s, JSDE, D) 43.23 M COCO / 69.32 M Cityscapes, each within 1 %."""
    model = build_model({**preset(dataset), "decoder": "jsde"})
    assert count(model.SE, model.hyperprior) == pytest.approx(8.31e6, rel=0.01)
    assert count(model.hyperprior, model.JSDE, model.D) == pytest.approx(cloud, rel=0.01)


def test_codec_and_jsde_train(ckpts, tmp_path):
    """train.py --decoder codec (255^2 MSE + bpp) ends with PSNR and real bpp; --decoder jsde
    starts from that codec (given, or found in out/<dataset>_codec), else from random weights
    with a line saying so; its edge then codes as the codec's did before fine-tuning."""
    codec = tmp_path / "codec"
    out = run_train(*QUICK, *TINY_CODEC, "--decoder", "codec", "--size", "64", "96", "--out-dir", str(codec)).stdout
    assert re.search(r"final val \(4 images\): PSNR \d+\.\d+ dB, SSIM \S+, bpp \(real bytes\)", out)
    model, ckpt = load_checkpoint(str(codec / "ckpt.pt"))
    assert model.image_out and ckpt["args"]["alpha"] == 0.01  # the codec's own default
    jsde = tmp_path / "jsde"
    out = run_train(*QUICK, *TINY_CODEC, "--decoder", "jsde", "--size", "64", "96", "--max-iters", "0",
                    "--codec-weights", str(codec / "ckpt.pt"), "--out-dir", str(jsde)).stdout
    assert "the image codec (g_a, h_a, h_s, entropy models) from" in out and "bpp (real bytes)" in out
    tuned, _ = load_checkpoint(str(jsde / "ckpt.pt"))
    x = val_dataset(ckpt["args"], limit=1)[0][0][0][None]
    assert tuned.compress(x) == model.compress(x)  # the same edge: the same bytes
    out = run_train(*QUICK, *TINY_CODEC, "--decoder", "jsde", "--size", "64", "96", "--max-iters", "2",
                    "--out-dir", str(tmp_path / "j2")).stdout
    assert "the image codec starts from random weights" in out and "mIoU" in out
    proc = run_train(*QUICK, "--decoder", "jsde", "--codec-weights", ckpts["none"], check=False)
    assert proc.returncode != 0 and "--codec-weights:" in proc.stdout and "lacks" in proc.stdout


def test_psnr_ssim_known_values():
    """PSNR of a uniform error e is -20 log10(e); SSIM of an image with itself is 1, and of
    two constant images a, b is (2ab + C1) / (a^2 + b^2 + C1) (no variance, no covariance)."""
    x = torch.rand(2, 3, 32, 32)
    assert evaluate_module.psnr(x + 0.1, x) == pytest.approx(torch.full((2,), 20.0), abs=1e-3)
    assert evaluate_module.ssim(x, x) == pytest.approx(torch.ones(2), abs=1e-5)
    a, b, C1 = 0.3, 0.6, 0.01**2
    value = evaluate_module.ssim(*(torch.full((1, 3, 16, 16), v, dtype=torch.float64) for v in (a, b))).item()
    assert value == pytest.approx((2 * a * b + C1) / (a * a + b * b + C1), abs=1e-9)
    assert evaluate_module.ssim(x, torch.rand(2, 3, 32, 32)).max() < 0.2  # unrelated noise


def test_inversion_attack(ckpts, tmp_path):
    """The attacker: an image decoder trained for 2 iterations on the frozen edge of a JD
    checkpoint (its bytes unchanged), then --privacy reports its PSNR and SSIM beside JPEG's
    and draws the picture. It needs an edge: without --edge-from, one clear line."""
    out = tmp_path / "attack"
    proc = run_train("--decoder", "inversion", "--edge-from", ckpts["jd"], "--F", "64", "--K", "1",
                     "--dilations", "1", "2", "3", "--max-iters", "2", "--eval-interval", "2", "--val-limit", "2",
                     "--batch-size", "2", "--out-dir", str(out))
    assert "frozen" in proc.stdout and re.search(r"final val \(2 images\): PSNR \d+\.\d+ dB", proc.stdout)
    attack, ckpt = load_checkpoint(str(out / "ckpt.pt"))
    victim, _ = load_checkpoint(ckpts["jd"])
    x = val_dataset(ckpt["args"], limit=1)[0][0][0][None]
    assert attack.compress(x) == victim.compress(x) and attack.decompress(victim.compress(x)).shape == x.shape
    proc = run_script("evaluate.py", "--privacy", str(out / "ckpt.pt"), "--limit", "2", "--image-codecs", "jpeg",
                      "--codec-qualities", "10", "--csv", str(tmp_path / "p.csv"), "--plot", str(tmp_path / "p.png"))
    assert "attack on jd" in proc.stdout and "jpeg" in proc.stdout
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "checkpoint,system,alpha,quality,bpp_real,psnr,ssim" and len(rows) == 4
    assert Image.open(tmp_path / "p.png").size[0] == 4 * 256  # original, attack, mask only, JPEG
    proc = run_train("--decoder", "inversion", check=False)
    assert proc.returncode != 0 and "--edge-from" in proc.stdout


def test_rd_compare():
    """JD vs Ahuja at equal bpp interpolates the other curve on log bpp (None outside its
    rates); each codec point (plain or fine-tuned) is compared with the best feature-coding
    point at no more bits."""
    rows = [dict(method="jd", bpp_real=0.05, miou=0.60), dict(method="jd", bpp_real=0.10, miou=0.70),
            dict(method="ahuja", bpp_real=0.2, miou=0.72), dict(method="ahuja", bpp_real=0.04, miou=0.62),
            dict(method="none", bpp_real=None, miou=0.8),
            dict(method="jpeg", bpp_real=0.3, miou=0.5), dict(method="jpeg", bpp_real=0.03, miou=0.4),
            dict(method="webp-ft", bpp_real=0.07, miou=0.65)]
    c = rd_compare(rows)
    at = {(r["at"], r["bpp"]): r for r in c["jd_vs_ahuja"]}
    t = np.log(0.05 / 0.04) / np.log(0.2 / 0.04)
    assert at["jd", 0.05]["ahuja"] == pytest.approx(0.62 + t * 0.10) and at["jd", 0.05]["jd"] == 0.60
    assert at["ahuja", 0.04]["jd"] is None and at["ahuja", 0.2]["jd"] is None
    assert sorted(c["feature_vs_codec"]) == ["jpeg", "webp-ft"]
    jpeg = {r["bpp"]: r for r in c["feature_vs_codec"]["jpeg"]}
    assert jpeg[0.3]["feature"] == 0.72 and jpeg[0.3]["margin"] == pytest.approx(0.22)
    assert jpeg[0.03]["feature"] is None
    assert c["feature_vs_codec"]["webp-ft"][0]["margin"] == pytest.approx(0.62 - 0.65)


def test_rd_csv_and_plot(ckpts, tmp_path):
    """--rd writes one CSV row per checkpoint, plus one per codec and quality for the
    No-Compression checkpoint (system = the codec, bpp_real from its files), and a PNG plot
    that decodes to the figure's size."""
    csv, png = tmp_path / "rd.csv", tmp_path / "rd.png"
    evaluate_main(get_args_parser().parse_args(["--rd", ckpts["jd"], ckpts["ahuja"], "--limit", "2",
                                                "--csv", str(csv), "--plot", str(png)]))
    lines = csv.read_text().splitlines()
    assert len(lines) == 1 + 2 and lines[1].split(",")[2] == "jd"
    assert Image.open(png).size == (700, 450)  # a PNG that decodes, at figsize (7, 4.5) and 100 dpi
    evaluate_main(get_args_parser().parse_args(["--rd", ckpts["jd"], ckpts["none"], "--limit", "2", "--csv", str(csv),
                                                "--image-codecs", "jpeg,webp", "--codec-qualities", "10", "60"]))
    rows = [dict(zip(lines[0].split(","), line.split(","))) for line in csv.read_text().splitlines()[1:]]
    assert [r["system"] for r in rows] == ["jd", "none", "jpeg", "jpeg", "webp", "webp"]
    assert all(float(r["bpp_real"]) > 0 for r in rows[2:])


def test_save_vis(ckpts, tmp_path):
    """--save-vis writes --n-vis pictures image | truth | prediction with the bpp in the name,
    a title strip above and a legend below; the ground-truth panel is the label's colours."""
    evaluate_main(get_args_parser().parse_args(["--ckpt", ckpts["jd"], "--limit", "2",
                                                "--save-vis", str(tmp_path), "--n-vis", "2"]))
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and re.fullmatch(r"000_\d\.\d{4}bpp\.png", names[0])
    picture = np.asarray(Image.open(tmp_path / names[0]))
    assert picture.shape[1] == 3 * 256 and picture.shape[0] > 16 + 128 + 10
    _, y = SyntheticStreets("val")[0]
    palette = np.array(SyntheticStreets.palette, np.uint8)
    assert np.array_equal(picture[16:16 + 128, 256:512], palette[y.numpy()])


def test_benchmark_cloud():
    """The cloud benchmark times JD (fused) and Ahuja's SD + D, entropy decoding, network and
    mask tail apart, on latents coded at about the asked rate; at the Cityscapes networks
    JD's network takes less time than SD + D's (2.9 % of its MACs)."""
    b = benchmark_cloud("cityscapes", size=(64, 128), batch=2, repeat=1, bpp=0.3, min_seconds=0)
    assert b["jd_network_ms"] < b["ahuja_network_ms"]
    for name in ("jd", "ahuja"):
        assert b[f"{name}_total_ms"] == pytest.approx(b[f"{name}_entropy_ms"] + b[f"{name}_network_ms"] + b["tail_ms"])
        assert b[f"{name}_images_per_s"] > 0
    assert b["ratio_total"] == pytest.approx(b["jd_total_ms"] / b["ahuja_total_ms"])
    assert 0.2 < b["bpp"] < 0.45 and b["bpp"] == pytest.approx(8 * b["bytes_per_image"] / (64 * 128))


# -----------------------------------------------------------------------------
# real datasets, on fixtures written here in their real layouts


def rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    """A Cityscapes tree: 2 train images in two cities, 2 val images, 64x128, labelIds with
    ids that map to several train ids and to 255."""
    root = tmp_path_factory.mktemp("cityscapes")
    rng = np.random.default_rng(0)
    labels = {}
    for split, cities in (("train", ["bremen", "aachen"]), ("val", ["lindau", "lindau"])):
        for k, city in enumerate(cities):
            stem = f"{city}_000000_00001{k}"
            ids = np.full((64, 128), 7, np.uint8)  # road
            ids[:20] = 23  # sky
            ids[20:40, :30] = 11  # building
            ids[40:, 100:] = 8  # sidewalk
            ids[30:50, 50:70] = 26  # car
            ids[50:, :10] = 0  # unlabeled
            ids[45:50, 80:84] = 4  # static (no train id)
            ids[10:12, 120:] = 33 if k else 24  # bicycle / person
            for folder, name, array in (("leftImg8bit", "leftImg8bit", rng.integers(0, 256, (64, 128, 3), np.uint8)),
                                        ("gtFine", "gtFine_labelIds", ids)):
                os.makedirs(root / folder / split / city, exist_ok=True)
                Image.fromarray(array).save(root / folder / split / city / f"{stem}_{name}.png")
            labels[(split, stem)] = ids
    return root, labels


def test_cityscapes_labels(cityscapes_root):
    """labelIds map to the 19 train ids exactly (others 255); file lists are sorted."""
    root, labels = cityscapes_root
    ds = get_dataset("cityscapes", "train", str(root))
    assert [os.path.basename(p) for p in ds.images] == ["aachen_000000_000011_leftImg8bit.png",
                                                        "bremen_000000_000010_leftImg8bit.png"]
    train_id = {7: 0, 8: 1, 11: 2, 23: 10, 24: 11, 26: 13, 33: 18, 0: 255, 4: 255}
    x, y = ds[0]
    expected = np.vectorize(train_id.get)(labels[("train", "aachen_000000_000011")])
    assert x.shape == (3, 64, 128) and np.array_equal(y.numpy(), expected)
    assert len(ds.classes) == 19 and ds.classes[13] == "car"


def test_training_transform(cityscapes_root):
    """The training transform gives crop x crop tensors, padded with 255 where the rescaled
    image is smaller, the same for the same (index, epoch) and different across epochs."""
    root, _ = cityscapes_root
    ds = get_dataset("cityscapes", "train", str(root), crop=96)
    x, y = ds[(1, 0)]
    assert x.shape == (3, 96, 96) and y.shape == (96, 96)
    assert torch.equal(ds[(1, 0)][1], y)
    assert any(not torch.equal(ds[(1, e)][0], x) for e in range(1, 4))
    assert set(y.unique().tolist()) <= {0, 1, 2, 10, 11, 13, 18, 255}


def test_missing_data_names_layout(tmp_path, cityscapes_root):
    """A missing or incomplete data root raises an error that shows the expected layout and
    where the data comes from."""
    with pytest.raises(FileNotFoundError, match="cityscapes-dataset.com") as e:
        get_dataset("cityscapes", "train", str(tmp_path / "nowhere"))
    assert "gtFine/{train,val}/<city>/" in str(e.value)
    with pytest.raises(FileNotFoundError, match="cocodataset.org"):
        get_dataset("coco", "val", str(tmp_path / "nowhere"))
    root, _ = cityscapes_root
    incomplete = tmp_path / "cs"
    (incomplete / "leftImg8bit" / "val" / "lindau").mkdir(parents=True)
    for p in (root / "leftImg8bit" / "val" / "lindau").iterdir():
        (incomplete / "leftImg8bit" / "val" / "lindau" / p.name).write_bytes(p.read_bytes())
    with pytest.raises(FileNotFoundError, match="2 label files"):
        get_dataset("cityscapes", "val", str(incomplete))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    """A COCO tree: a polygon, an uncompressed-RLE crowd, a compressed-RLE mask, two
    overlapping instances of different classes (and two of one class), a non-VOC category;
    one training image whose kept area is below 1000 pixels."""
    from pycocotools import mask as coco_mask
    root = tmp_path_factory.mktemp("coco")
    H, W = 40, 60
    cats = [{"id": i, "name": f"c{i}", "supercategory": "x"} for i in (1, 3, 17, 18, 65)]

    def rle(m, compressed):
        r = coco_mask.encode(np.asfortranarray(m))
        if compressed:
            return {"size": [H, W], "counts": r["counts"].decode()}
        flat, counts, value, run = m.flatten(order="F"), [], 0, 0  # uncompressed: run lengths
        for v in flat:
            if v != value:
                counts.append(run)
                value, run = v, 0
            run += 1
        return {"size": [H, W], "counts": counts + [run]}

    person = rect(H, W, 5, 25, 5, 25)  # polygon, person (VOC 15)
    cat = rect(H, W, 15, 35, 15, 35)  # polygon, cat (VOC 8), overlaps the person
    car = rect(H, W, 0, 10, 40, 60)  # uncompressed-RLE crowd, car (VOC 7)
    dog = rect(H, W, 30, 40, 40, 50)  # compressed RLE, dog (VOC 12)
    dog2 = rect(H, W, 35, 40, 45, 55)  # a second dog overlapping the first: stays dog
    bed = rect(H, W, 0, 40, 0, 60)  # bed is not a VOC class: ignored
    anns = [  # (image, category, crowd, segmentation, mask)
        (1, 1, 0, [[5, 5, 25, 5, 25, 25, 5, 25]], person),
        (1, 17, 0, [[15, 15, 35, 15, 35, 35, 15, 35]], cat),
        (1, 3, 1, rle(car, False), car),
        (1, 18, 0, rle(dog, True), dog),
        (1, 18, 0, rle(dog2, True), dog2),
        (1, 65, 0, rle(bed, True), bed),
        (2, 1, 0, [[0, 0, 20, 0, 20, 20, 0, 20]], rect(H, W, 0, 20, 0, 20)),  # 400 px only
    ]
    anns = [{"id": i + 1, "image_id": im, "category_id": c, "iscrowd": crowd, "segmentation": seg,
             "area": float(m.sum()), "bbox": [0, 0, W, H]} for i, (im, c, crowd, seg, m) in enumerate(anns)]
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": H, "width": W} for i in (1, 2)]
    expected = np.zeros((H, W), np.uint8)
    expected[person == 1] = 15
    expected[cat == 1] = 8
    expected[(person & cat) == 1] = 255
    expected[car == 1] = 7
    expected[(dog | dog2) == 1] = 12
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for split, imgs, ann in (("train", images + [dict(images[0], id=3, file_name="000000000003.jpg"),
                                                 dict(images[0], id=4, file_name="000000000004.jpg")],
                              anns + [dict(a, id=a["id"] + 100 * k, image_id=k) for k in (3, 4) for a in anns[:6]]),
                             ("val", images[:1], anns[:6])):
        (root / f"{split}2017").mkdir()
        for img in imgs:
            Image.fromarray(rng.integers(0, 256, (H, W, 3), np.uint8)).save(root / f"{split}2017" / img["file_name"])
        json.dump({"images": imgs, "annotations": ann, "categories": cats},
                  open(root / "annotations" / f"instances_{split}2017.json", "w"))
    return root, expected


def test_coco_labels(coco_root):
    """Instances merge into the 21-class map exactly: polygons, uncompressed-RLE crowds and
    compressed RLE decoded; overlaps of two classes -> 255, of one class -> that class;
    non-VOC categories -> background; training images with kept area <= 1000 dropped."""
    root, expected = coco_root
    val = get_dataset("coco", "val", str(root))
    assert np.array_equal(val.label(1), expected)
    x, y = val[0]  # resized so that the longer side is 513, padded to 513x513 with 255
    assert x.shape == (3, 513, 513) and (y[342:] == 255).all() and (y[:340] != 255).any()
    train = get_dataset("coco", "train", str(root), crop=32)
    assert train.ids == [1, 3, 4]
    assert train[(0, 0)][0].shape == (3, 32, 32)


def test_coco_degenerate_annotations(coco_root, tmp_path):
    """Polygon parts of fewer than 6 coordinates and empty segmentations are skipped with one
    warning that counts them and names the first image and annotation; the rest of the
    annotation still counts. An annotation without 'area' is a clear error."""
    root, expected = coco_root
    anns = json.load(open(root / "annotations" / "instances_val2017.json"))
    person = anns["annotations"][0]  # the person polygon of image 1
    person["segmentation"] = person["segmentation"] + [[1, 1, 2, 2]]  # a 4-coordinate part
    anns["annotations"] += [dict(person, id=90, segmentation=[]), dict(person, id=91, segmentation=[[3, 3, 4, 4]])]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").symlink_to(root / "val2017")
    json.dump(anns, open(tmp_path / "annotations" / "instances_val2017.json", "w"))
    with pytest.warns(UserWarning, match=r"skipped 2 polygon parts .* and 2 annotations .* image 1, annotation 1\)"):
        ds = get_dataset("coco", "val", str(tmp_path))
    assert np.array_equal(ds.label(1), expected)
    del anns["annotations"][2]["area"]
    json.dump(anns, open(tmp_path / "annotations" / "instances_val2017.json", "w"))
    with pytest.raises(ValueError, match="annotation 3 of image 1 has no 'area'"):
        get_dataset("coco", "val", str(tmp_path))


def test_train_on_fixtures(cityscapes_root, coco_root, tmp_path):
    """A short train.py run completes on each real-layout fixture with its preset."""
    light = ["--encoder", "resnet18-l2", "--encoder-weights", "none", "--F", "64", "--K", "1", "--batch-size", "2",
             "--max-iters", "2",
             "--eval-interval", "2", "--num-workers", "0", "--dilations", "1", "2", "3"]
    out = run_train("--dataset", "cityscapes", "--data-root", str(cityscapes_root[0]), "--crop", "64",
                    *light, "--out-dir", str(tmp_path / "cs")).stdout
    assert "final val (2 images)" in out
    assert json.load(open(tmp_path / "cs" / "metrics.json"))["args"]["num_classes"] == 19
    out = run_train("--dataset", "coco", "--data-root", str(coco_root[0]), "--crop", "64", "--val-limit", "1",
                    *light, "--out-dir", str(tmp_path / "coco")).stdout
    assert "final val (1 images)" in out


def test_print_config_is_table_3():
    """--dataset cityscapes --K 3 --print-config shows Suppl. Table 3's values, without data."""
    out = run_train("--dataset", "cityscapes", "--K", "3", "--print-config").stdout
    cfg = json.loads(out[: out.rindex("}") + 1])
    assert {k: cfg[k] for k in ("max_iters", "batch_size", "lr", "lr_aux", "crop", "F", "K", "num_classes",
                                "encoder", "dilations", "clip", "head")} == dict(
        max_iters=80000, batch_size=8, lr=1e-3, lr_aux=1e-3, crop=769, F=512, K=3, num_classes=19,
        encoder="resnet50", dilations=[5, 10, 15], clip=1.0, head="mmseg")
    cfg = json.loads(run_train("--dataset", "coco", "--print-config").stdout.split("\nfixed")[0])
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["lr_aux"], cfg["crop"], cfg["F"], cfg["K"]) == \
        (42, 16, 1e-2, 1e-3, 513, 256, 1)


def test_encoder_weights(tmp_path):
    """A torchvision ResNet state dict, a DeepLabv3-style "backbone." state dict and our own
    checkpoint load into E; unused keys are reported; another architecture's are refused."""
    import torchvision
    resnet18 = torchvision.models.resnet18().state_dict()
    torch.save(resnet18, tmp_path / "r18.pth")
    E = tiny_model("jd").E
    unused = load_encoder_weights(E, str(tmp_path / "r18.pth"))
    assert torch.equal(E.layer2[0].conv1.weight, resnet18["layer2.0.conv1.weight"])
    assert "fc.weight" in unused and "layer4.0.conv1.weight" in unused
    torch.save({**{f"backbone.{k}": v for k, v in resnet18.items()}, "classifier.4.weight": torch.zeros(1)},
               tmp_path / "deeplab.pth")
    assert "classifier.4.weight" not in load_encoder_weights(E, str(tmp_path / "deeplab.pth"))
    own = tiny_model("none", seed=5)  # a No Compression model's checkpoint, as train.py saves it
    torch.save({"model": own.state_dict(), "args": {}}, tmp_path / "own.pt")
    load_encoder_weights(E, str(tmp_path / "own.pt"))
    assert torch.equal(E.conv1.weight, own.E.conv1.weight)
    with torch.device("meta"):
        E50 = DistributedSegmenter("none", S=3, F=64, encoder="resnet50").E
    with pytest.raises(ValueError, match="shaped otherwise|lacks"):
        load_encoder_weights(E50, str(tmp_path / "r18.pth"))


# -----------------------------------------------------------------------------
# pretrained weights through torchvision's weights API, from fake caches


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A temporary TORCH_HOME whose hub cache holds random weights under torchvision's real
    file names, and an unusable proxy, so that nothing here can reach the network."""
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # the discard port: a download fails at once
    return home / "hub" / "checkpoints"


def test_learned_codec_from_the_hub_cache(fake_hub, monkeypatch):
    """The learned codec (CompressAI's scale hyperprior) loads from CompressAI's file name in
    the hub cache with no network; the decoded image has the input's size; its bytes are the
    coded strings plus 4 for the size, within 5 % of the likelihoods' bits on a 64x64 image.
    Random weights, with y and sigma in a trained codec's range (random g_a gives y ~ 0, whose
    stream would be only its 8 fixed bytes): g_a's last layer x30 (y's std ~1.2), h_s's last
    layer sigma = 2 everywhere. A missing file: one line naming it."""
    from compressai.models import ScaleHyperprior
    from compressai.zoo.image import model_urls
    monkeypatch.setattr(evaluate_module, "LEARNED", {})
    with pytest.raises(ValueError, match=r"bmshj2018-hyperprior-1-7eb97409\.pth\.tar is not in the torch hub cache"):
        image_codec_format("learned")
    torch.manual_seed(0)
    net = ScaleHyperprior(128, 192)  # random weights under the real name (qualities 1-5 have this size)
    with torch.no_grad():
        net.g_a[6].weight.mul_(30)
        net.h_s[4].weight.zero_()
        net.h_s[4].bias.fill_(2.0)
    for q in evaluate_module.IMAGE_CODECS["learned"][2]:
        torch.save(net.state_dict(), fake_hub / os.path.basename(model_urls["bmshj2018-hyperprior"]["mse"][q]))
    image_codec_format("learned")
    image = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)
    decoded, n_bytes = code_image(image, "learned", 1)
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    codec = evaluate_module.LEARNED[1]
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        estimate = sum(-torch.log2(p).sum().item() for p in codec(x)["likelihoods"].values())
    assert n_bytes == 4 + sum(len(s[0]) for s in codec.compress(x)["strings"])
    assert 8 * (n_bytes - 4) == pytest.approx(estimate, rel=0.05)
    assert code_image(image[:40, :50], "learned", 2)[0].shape == (40, 50, 3)  # padded to 64, cropped back


def test_deeplabv3_coco_is_torchvisions_model(fake_hub, coco_root, tmp_path):
    """--dataset coco --decoder none --encoder-weights deeplabv3-coco --max-iters 0 writes a
    checkpoint whose model gives torchvision's deeplabv3_resnet50 logits (same file, eval
    mode, max |diff| < 1e-4); the aux classifier is dropped."""
    import torchvision
    torch.manual_seed(0)
    tv = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21,
                                                            aux_loss=True)
    g = torch.Generator().manual_seed(0)
    for m in tv.modules():  # mild random BN statistics, so that a BN mapped to the wrong layer shows
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.8 + 0.4 * torch.rand(n, generator=g))
            m.weight.data.copy_(0.8 + 0.4 * torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    torch.save(tv.state_dict(), fake_hub / "deeplabv3_resnet50_coco-cd0a2569.pth")
    out = run_train("--dataset", "coco", "--data-root", str(coco_root[0]), "--decoder", "none",
                    "--encoder-weights", "deeplabv3-coco", "--max-iters", "0", "--val-limit", "1",
                    "--num-workers", "0", "--out-dir", str(tmp_path / "d")).stdout
    assert "E and D initialized from" in out and "aux_classifier" in out and "final val (1 images)" in out
    model, _ = load_checkpoint(str(tmp_path / "d" / "ckpt.pt"))
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert (model(x)["logits"] - tv.eval()(x)["out"]).abs().max() < 1e-4


def test_offline_without_cache_names_the_file(fake_hub, cityscapes_root):
    """With an empty cache and no network, --encoder-weights imagenet (the real presets'
    default) stops with one message naming the file, its URL and the cache path."""
    proc = run_train("--dataset", "cityscapes", "--data-root", str(cityscapes_root[0]), "--max-iters", "1",
                     check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout
    assert "resnet50-0676ba61.pth" in proc.stdout and "https://download.pytorch.org/models/" in proc.stdout
    assert str(fake_hub / "resnet50-0676ba61.pth") in proc.stdout


def test_resnet101_encoder_from_imagenet_cache(fake_hub, cityscapes_root, tmp_path):
    """--encoder resnet101 --encoder-weights imagenet loads torchvision's ResNet-101 file from
    the cache into E (dilated, 2048 channels at H/8) and trains 2 iterations."""
    import torchvision
    torch.manual_seed(0)
    r101 = torchvision.models.resnet101().state_dict()
    torch.save(r101, fake_hub / "resnet101-63fe2227.pth")
    out = run_train("--dataset", "cityscapes", "--data-root", str(cityscapes_root[0]), "--encoder", "resnet101",
                    "--encoder-weights", "imagenet", "--crop", "64", "--F", "64", "--K", "1", "--batch-size", "2",
                    "--max-iters", "2", "--eval-interval", "2", "--num-workers", "0", "--val-limit", "1",
                    "--out-dir", str(tmp_path / "r101")).stdout
    assert f"E initialized from {fake_hub / 'resnet101-63fe2227.pth'}; keys not used: fc.weight, fc.bias" in out
    model, _ = load_checkpoint(str(tmp_path / "r101" / "ckpt.pt"))
    assert model.E.C == 2048 and len(model.E.layer3) == 23
    with torch.no_grad():
        assert model.E(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 8, 8)
