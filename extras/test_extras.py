"""
Tests of extras/: the systems and tools beyond the method (Fig. 1a/1b's image-codec systems,
the attacker, the fast deployed cloud and its benchmark, the complexity tables, pretrained
weights). CPU only, tiny shapes, fixed seeds; they run with test_all.py under the README's one
test command, and use its helpers.
"""
import copy
import io
import os
import re
import sys

import numpy as np
import PIL.features
import pytest
import torch
from PIL import Image
from torch.nn.functional import interpolate

import entropy
from data import SYNTHETIC_CLASSES, SyntheticStreets, preset, val_dataset
from entropy import HyperpriorCoder
from extras import bitstream_guard as guard
from extras import image_codecs
from extras.benchmark import benchmark_cloud
from extras.complexity import complexity, jd_widths
from extras.fast_cloud import (FastHyperpriorCoder, conv3x3_float64, low_res_logits, masks, segment, speed_up,
                               upsampled_masks)
from extras.image_codecs import code_image, codec_rd, image_codec_format
from extras.image_quality import psnr, ssim
from extras.learned_codec import codec_HD, load_codec_weights
from extras.rd_claims import ablation_compare, rd_compare
from extras.weights import load_encoder_weights
from evaluate import rd_points
from model import E, HD, build_model, load_checkpoint
from reparam import reparameterize
from test_all import QUICK, count, finish, forked, randomize_bn, run_script, run_train, tiny_model
from test_all import ckpts, cityscapes_root, coco_root, coded  # noqa: F401  (fixtures)

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


def test_complexity_by_width_and_K():
    """Fig. 7/8's complexity axis: the deployed cloud is the same for every K (fusion is free),
    training-time JD grows with K, and the cloud grows with F; the paper's Cityscapes JD (F 512)
    is its Table 2's 4.92 M parameters."""
    rows = jd_widths("cityscapes", [64, 512], [0, 3])
    by = {(r["F"], r["K"]): r for r in rows}
    for F in (64, 512):
        assert by[F, 0]["jd_params"] == by[F, 3]["jd_params"] < by[F, 3]["jd_train_params"]
        assert by[F, 0]["jd_gmacs"] == by[F, 3]["jd_gmacs"] < by[F, 3]["jd_train_gmacs"]
    assert by[64, 0]["jd_params"] < by[512, 0]["jd_params"] == pytest.approx(4.92e6, rel=0.01)


@pytest.mark.parametrize("hd", ["jd", "codec"])
def test_sigma_for_coding_is_hd_in_float64(hd):
    """The fast coder's float64 HD (transposed convs on channels-last inputs, the 3x3 conv as 9
    matrix products, conv3x3_float64) is the plain coder's: within 1e-12, and the float32 sigma
    that the scale indexes come from is the same, at sizes down to 1 x 1."""
    torch.manual_seed(0)
    N, M, layers = (64, 64, HD(64)) if hd == "jd" else (16, 24, codec_HD(16, 24))
    hp, fast = HyperpriorCoder(layers, N, M), FastHyperpriorCoder(layers, N, M)
    weights = {n: t.double() for n, t in layers.state_dict().items()}
    for size in [(16, 32), (3, 5), (1, 1)]:
        h_hat = torch.round(3 * torch.randn(2, N, *size))
        x = torch.randn(2, N, *size, dtype=torch.float64)
        w, b = torch.randn(M, N, 3, 3, dtype=torch.float64), torch.randn(M, dtype=torch.float64)
        with torch.no_grad():
            assert (conv3x3_float64(x, w, b) - torch.conv2d(x, w, b, padding=1)).abs().max() <= 1e-12
            plain = torch.func.functional_call(layers, weights, (h_hat.double(),))[..., : 4 * size[0] - 1, :]
            sigma = hp.sigma_for_coding(h_hat, (4 * size[0] - 1, 4 * size[1]))  # cropped as r's size is
            sigma_fast = fast.sigma_for_coding(h_hat, (4 * size[0] - 1, 4 * size[1]))
        assert sigma.dtype == torch.float32 and torch.equal(sigma, plain.float()) and torch.equal(sigma_fast, sigma)


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


@pytest.mark.parametrize("size", [(64, 96), (72, 104), (70, 99)])
def test_fast_cloud_equals_eval_forward(size):
    """The fast path (fast_cloud.speed_up: pooled branch as a bias, DWUpConv and classifier as
    one sub-pixel conv, float64 HD by matrix products; masks via amax, upsampled in strips)
    gives the masks of the plain eval forward of the K-branch model and of the plain deployed
    checkpoint, from its forward and from the bytes (segment), with logits within 1e-4 (1e-10
    in float64: the same function); the plain and the fast cloud decode each other's bytes.
    Strips run where H = 8h (64, 72: h = 8, 9), one interpolation elsewhere (70)."""
    model = tiny_model("jd", K=3)
    randomize_bn(model)
    model.eval()
    model.hyperprior.update()
    plain_deployed = reparameterize(model)
    deployed = speed_up(reparameterize(model))
    assert type(deployed.JD).__name__ == "FoldedTailJD" and type(deployed.JD.aspp).__name__ == "PooledBiasASPP"
    assert type(plain_deployed.JD).__name__ == "JD"
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        plain = model(x)["logits"]
        fast = deployed(x)["logits"]
        assert (plain - fast).abs().max() <= 1e-4
        assert torch.equal(masks(fast), plain.argmax(1))
        assert torch.equal(masks(deployed.decompress(model.compress(x))), plain.argmax(1))
        assert torch.equal(segment(deployed, model.compress(x)), plain.argmax(1))
        assert torch.equal(plain_deployed.decompress(deployed.compress(x)).argmax(1), plain.argmax(1))
        assert deployed.compress(x) == plain_deployed.compress(x) == model.compress(x)
        ahuja = tiny_model("ahuja").eval()
        ahuja.hyperprior.update()
        assert torch.equal(segment(speed_up(copy.deepcopy(ahuja)), ahuja.compress(x)), ahuja(x)["logits"].argmax(1))
        low = low_res_logits(deployed, deployed.hyperprior(*deployed.edge(x))[0], size)
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
    assert torch.equal(model.decompress(strings).argmax(1), out["logits"].argmax(1))
    for i, s in enumerate(strings):
        (tmp_path / f"{i}.dssj").write_bytes(s)
    from_files = [(tmp_path / f"{i}.dssj").read_bytes() for i in range(2)]
    assert torch.equal(model.decompress(from_files), model.decompress(strings))
    monkeypatch.setattr(entropy, "STREAM_SYMBOLS", 100)  # 24 * 5 * 7 = 840 symbols: 9 streams (N's 16: 6)
    cut = model.compress(x)
    assert len(guard.unpack(cut[0], model.hyperprior.model_id(), model.hyperprior.N, 24)["b_r"]) == 9
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
    assert psnr(x + 0.1, x) == pytest.approx(torch.full((2,), 20.0), abs=1e-3)
    assert ssim(x, x) == pytest.approx(torch.ones(2), abs=1e-5)
    a, b, C1 = 0.3, 0.6, 0.01**2
    value = ssim(*(torch.full((1, 3, 16, 16), v, dtype=torch.float64) for v in (a, b))).item()
    assert value == pytest.approx((2 * a * b + C1) / (a * a + b * b + C1), abs=1e-9)
    assert ssim(x, torch.rand(2, 3, 32, 32)).max() < 0.2  # unrelated noise


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
    point at no more bits and with JD's curve at its rate; both for each reading of E's start;
    each E-trained-on point against the same system's E-frozen curve."""
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
    t = np.log(0.07 / 0.05) / np.log(0.10 / 0.05)  # and JD's curve at the codec's rate, on log bpp
    assert c["feature_vs_codec"]["webp-ft"][0]["jd_curve"] == pytest.approx(0.60 + t * 0.10)
    assert jpeg[0.3]["jd_curve"] is None  # outside JD's rates
    # each reading of E's start (train.py --freeze-encoder) is a curve of its own and its own claims
    rows += [dict(method="jd", reading="frozen", bpp_real=0.2, miou=0.5), dict(method="ahuja", reading="frozen",
                                                                             bpp_real=0.1, miou=0.4)]
    c = rd_compare(rows)
    frozen = [r for r in c["jd_vs_ahuja"] if r["reading"] == "frozen"]
    assert [(r["at"], r["jd"], r["ahuja"]) for r in frozen] == [("jd", 0.5, None), ("ahuja", None, 0.4)]
    jpeg = {(r["bpp"], r["reading"]): r for r in c["feature_vs_codec"]["jpeg"]}
    assert jpeg[0.3, "frozen"]["feature"] == 0.5 and jpeg[0.3, ""]["feature"] == 0.72
    assert c["trained_vs_frozen"] == []  # no trained-on point yet
    rows += [dict(method="jd", reading="frozen", bpp_real=0.4, miou=0.6),
             dict(method="jd", reading="trained on", bpp_real=0.3, miou=0.58),
             dict(method="jd", reading="trained on", bpp_real=0.1, miou=0.45, seed=1),
             dict(method="ahuja", reading="trained on", bpp_real=0.1, miou=0.42)]
    t = np.log(0.3 / 0.2) / np.log(0.4 / 0.2)
    assert rd_compare(rows)["trained_vs_frozen"] == [
        dict(method="jd", seed=0, bpp=0.3, trained_on=0.58, frozen=pytest.approx(0.5 + t * 0.1)),
        dict(method="jd", seed=1, bpp=0.1, trained_on=0.45, frozen=None),  # below the frozen curve's rates
        dict(method="ahuja", seed=0, bpp=0.1, trained_on=0.42, frozen=0.4)]  # a one-point curve at its rate


def test_ablation_compare():
    """The ablations: JD's curve of each value of a setting against the preset's value's curve of
    the same seed at equal bpp (both ways, None outside), dilations named as in the CSV, and the
    seed spread at each alpha; Ahuja et al.'s rows take no part."""
    rows = [dict(method="jd", K=k, dilations="1-2-3", alpha=a, seed=s, bpp_real=b, miou=m) for k, a, s, b, m in [
        (3, 0.6, 0, 0.10, 0.65), (3, 0.9, 0, 0.40, 0.73), (0, 0.6, 0, 0.12, 0.64), (0, 0.9, 0, 0.45, 0.74),
        (3, 0.6, 1, 0.10, 0.66), (0, 0.6, 1, 0.11, 0.63)]]
    rows.append(dict(method="ahuja", K=3, alpha=0.6, bpp_real=0.1, miou=0.1))
    c = ablation_compare(rows, ["K"], {"K": 3})
    s0 = {(r["at"], r["bpp"]): r for r in c["vs_reference"] if r["seed"] == 0}
    t = np.log(0.12 / 0.10) / np.log(0.40 / 0.10)
    assert s0["value", 0.12]["reference"] == pytest.approx(0.65 + t * 0.08) and s0["value", 0.12]["miou"] == 0.64
    assert s0["value", 0.45]["reference"] is None and s0["reference", 0.10]["miou"] is None
    assert s0["reference", 0.40]["miou"] == pytest.approx(0.64 + np.log(0.40 / 0.12) / np.log(0.45 / 0.12) * 0.10)
    assert all(r["value"] == (0,) for r in c["vs_reference"])
    spread = {(r["value"], r["alpha"]): r["spread"] for r in c["seed_spread"]}
    assert spread == {((0,), 0.6): pytest.approx(0.01), ((3,), 0.6): pytest.approx(0.01)}
    c = ablation_compare(rows, ["dilations"], {"dilations": [1, 2, 3]})  # the preset's list, the CSV's string
    assert c["reference"] == ("1-2-3",) and c["vs_reference"] == []  # one value only: nothing to compare


def test_benchmark_train():
    """--benchmark train times a training step of JD and Ahuja et al. with E (and D) frozen and
    trained on, and reports each configuration's peak memory; --K: JD at each K, --encoder: another E."""
    from extras.benchmark import main
    out, _ = main(["--benchmark", "train", "--dataset", "synthetic", "--size", "32", "64", "--batch-size", "2",
                   "--steps", "1"])
    assert out["size"] == [32, 64] and out["batch"] == 2
    for name in ("jd_frozen", "jd_trained_on", "ahuja_frozen", "ahuja_trained_on"):
        assert out[f"{name}_ms"] > 0 and out[f"{name}_peak_memory_mb"] > 0
    out, _ = main(["--benchmark", "train", "--dataset", "camvid", "--size", "32", "64", "--batch-size", "2",
                   "--steps", "1", "--K", "0", "2", "--encoder", "resnet18-l2"])  # Fig. 8's cost, not the preset's E
    assert out["systems"] == ["jd_K0", "jd_K2"] and out["encoder"] == "resnet18-l2" and out["jd_K2_frozen_ms"] > 0


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
        E50 = tiny_model("none", num_classes=3, encoder="resnet50").E
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
    monkeypatch.setattr(image_codecs, "LEARNED", {})
    with pytest.raises(ValueError, match=r"bmshj2018-hyperprior-1-7eb97409\.pth\.tar is not in the torch hub cache"):
        image_codec_format("learned")
    torch.manual_seed(0)
    net = ScaleHyperprior(128, 192)  # random weights under the real name (qualities 1-5 have this size)
    with torch.no_grad():
        net.g_a[6].weight.mul_(30)
        net.h_s[4].weight.zero_()
        net.h_s[4].bias.fill_(2.0)
    for q in image_codecs.IMAGE_CODECS["learned"][2]:
        torch.save(net.state_dict(), fake_hub / os.path.basename(model_urls["bmshj2018-hyperprior"]["mse"][q]))
    image_codec_format("learned")
    image = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)
    decoded, n_bytes = code_image(image, "learned", 1)
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    codec = image_codecs.LEARNED[1]
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
    x = torch.randn(1, 3, 128, 128)  # z 16x16: dilation 12's outer taps land inside it
    with torch.no_grad():
        assert (model(x)["logits"] - tv.eval()(x)["out"]).abs().max() < 1e-4
    # the paper's protocol on COCO: JD's E is that model's, frozen; evaluation alone needs no training
    # batch (preset batch 16, DataLoader workers, a 2-image training set)
    out = run_train("--dataset", "coco", "--data-root", str(coco_root[0]), "--max-iters", "0", "--val-limit", "1",
                    "--out-dir", str(tmp_path / "jd")).stdout
    assert f"E from the No Compression model {fake_hub / 'deeplabv3_resnet50_coco-cd0a2569.pth'}, frozen" in out
    jd, ckpt = load_checkpoint(str(tmp_path / "jd" / "ckpt.pt"))
    backbone = {k[len("backbone."):]: v for k, v in tv.state_dict().items() if k.startswith("backbone.")}
    assert all(torch.equal(v, backbone[k]) for k, v in jd.E.state_dict().items())
    assert (ckpt["args"]["nocomp_model"], ckpt["args"]["freeze_encoder"]) == ("deeplabv3-coco", True)


def test_offline_without_cache_names_the_file(fake_hub, cityscapes_root):
    """With an empty cache and no network, --encoder-weights imagenet (the real presets'
    default for No Compression) stops with one message naming the file, its URL and the cache path."""
    proc = run_train("--dataset", "cityscapes", "--data-root", str(cityscapes_root[0]), "--max-iters", "1",
                     "--decoder", "none", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout
    assert "resnet50-0676ba61.pth" in proc.stdout and "https://download.pytorch.org/models/" in proc.stdout
    assert str(fake_hub / "resnet50-0676ba61.pth") in proc.stdout


def test_resnet101_encoder_from_imagenet_cache(fake_hub, cityscapes_root, tmp_path):
    """--encoder resnet101 --encoder-weights imagenet loads torchvision's ResNet-101 file from
    the cache into E (dilated, 2048 channels at H/8); the system it is part of evaluates."""
    import torchvision
    torch.manual_seed(0)
    r101 = torchvision.models.resnet101().state_dict()
    torch.save(r101, fake_hub / "resnet101-63fe2227.pth")
    out = run_train("--dataset", "cityscapes", "--data-root", str(cityscapes_root[0]), "--encoder", "resnet101",
                    "--encoder-weights", "imagenet", "--crop", "64", "--F", "64", "--K", "1", "--max-iters", "0",
                    "--num-workers", "0", "--val-limit", "1",
                    "--out-dir", str(tmp_path / "r101")).stdout
    assert f"E initialized from {fake_hub / 'resnet101-63fe2227.pth'}; keys not used: fc.weight, fc.bias" in out
    assert "final val (1 images)" in out
    model, _ = load_checkpoint(str(tmp_path / "r101" / "ckpt.pt"))
    assert model.E.C == 2048 and len(model.E.layer3) == 23
    with torch.no_grad():
        assert model.E(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 8, 8)


# -----------------------------------------------------------------------------
# hostile input (bitstream_guard.py): every byte string is decoded or refused with a ValueError,
# never a crash


FUZZ = r"""
import random, sys, time, torch
import entropy
from extras import bitstream_guard as guard
from test_all import tiny_model
torch.set_num_threads(1)
entropy.STREAM_SYMBOLS = 64  # b_r in 3 rANS streams at 64x96, so that their boundaries are fuzzed too
model = tiny_model("jd", K=1, N=8).eval()
model.hyperprior.update()
mid = model.hyperprior.model_id()
x = torch.randn(2, 3, 64, 96)
valid = model.compress(x)
fields = [guard.unpack(s, mid, 8, 8) for s in valid]
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
        yield forge(b_h, b_r, rng.choice([(65535, 65535), (4096, 4096), (1, 2**20), (0, 96), (2097151, 4),
                                          (4, 2097151), (16, 524288), (64, 131072)]))  # huge or thin
        s = forge(b_h, b_r)
        at = rng.randrange(2, 4)  # H or W (one byte each here) in two bytes, the check value fixed
        head = s[:at] + bytes([s[at] | 0x80, 0]) + s[at + 1:-len(b_h + b"".join(b_r)) - 4]
        yield head + guard.check_value(mid, head, b_h + b"".join(b_r)) + b_h + b"".join(b_r)
        yield forge(rand(rng.randrange(0, 16)), [rand(rng.randrange(0, 16)) for s in b_r])  # short random payloads
        yield forge(b_h, b_r[:j] + [rand(4 * rng.randrange(2, 300))] + b_r[j + 1:])  # a random stream after a valid b_h
        yield forge(rand(4 * rng.randrange(2, 40)), [rand(4 * rng.randrange(2, 300)) for s in b_r])
        yield forge(b_h, b_r[:j] + [b_r[j][:-4 * rng.randrange(1, 4)]] + b_r[j + 1:])  # cut short, check fixed
        s = bytearray(b_r[j])
        s[rng.randrange(len(s))] ^= 1 << rng.randrange(8)
        yield forge(b_h, b_r[:j] + [bytes(s)] + b_r[j + 1:])  # a flipped bit, check fixed
        yield rand(rng.randrange(0, 64))  # noise
n = decoded = refused_varints = 0
t0 = time.time()
for s in mutations():
    try:
        out = model.decompress([s])
        size = guard.unpack(s, mid, 8, 8)["image_size"]
        assert out.shape == (1, 5, *size), out.shape
        decoded += 1
    except ValueError as e:
        refused_varints += "redundant zero byte" in str(e)
    n += 1
print(f"{refused_varints} non-canonical")
print(f"{n} strings, {decoded} decoded, {n - decoded} refused, {time.time() - t0:.1f} s")
"""


ENCODER_OVERFLOW = r"""
import torch
from test_all import tiny_model
model = tiny_model("jd", K=1).eval()
model.hyperprior.update()
r, h = torch.randn(1, 64, 4, 6), torch.randn(1, 64, 1, 2)
for name, (r_, h_) in {"h": (r, h * 1.4e9), "r": (r * 2e8, h), "r mean": (r.sign() * 3000, h)}.items():
    try:
        model.hyperprior.compress(r_, h_, (64, 96))
        print(name, "coded")
    except ValueError as e:
        print(name, "refused:", e)
"""


@pytest.fixture(scope="module")
def crash_prone(tmp_path_factory):
    """ENCODER_OVERFLOW, then FUZZ, in one forked process: a crash of the C++ coder, or a hang
    under the time limit, fails the tests instead of pytest."""
    return finish(forked(tmp_path_factory.mktemp("fuzz") / "log", exec, ENCODER_OVERFLOW + FUZZ, {}))


def test_fuzz_decompress_never_crashes(crash_prone):
    """3000 structured mutations of strings with 3 b_r streams, the check value recomputed
    (stream boundaries shifted, streams swapped, empty and short payloads, other, huge and
    thin sizes, non-canonical varints, random streams after a valid header, cut streams,
    flipped bits) and noise: each is decoded to masks of its declared size or refused with a
    ValueError."""
    proc = crash_prone
    assert proc.returncode == 0, proc.stdout[-3000:]
    n, decoded = map(int, re.search(r"(\d+) strings, (\d+) decoded", proc.stdout).groups())
    refused_varints = int(re.search(r"(\d+) non-canonical", proc.stdout)[1])
    assert n == 3000 and decoded < n and refused_varints == 250


def test_encoder_refuses_latents_it_cannot_code(crash_prone):
    """Latents of an untrained or diverged model (|h| up to 1.4e9, |r| up to 2e8, or every
    |r| = 3000, which would overrun the encoder's buffer) are refused with a ValueError,
    instead of CompressAI's encoder looping forever or writing past its buffer."""
    proc = crash_prone
    assert proc.returncode == 0, proc.stdout
    for name in ("h", "r", "r mean"):
        assert re.search(rf"^{name} refused: cannot code .* untrained or diverged", proc.stdout, re.M), proc.stdout


def test_payload_lengths_refused(coded):
    """A header with a valid check value and empty, not whole-word or overlong payloads is
    refused before the C++ decoder could read past them (or their zero padding could grow
    with them)."""
    model, x, strings = coded
    mid = model.hyperprior.model_id()
    f = guard.unpack(strings[0], mid, model.hyperprior.N, model.hyperprior.M)
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
