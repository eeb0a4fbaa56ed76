"""
Tests: CPU only, tiny shapes, fixed seeds. Each states its invariant in its docstring.

    python -m pytest -q test_all.py
"""
import os
import re
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import entropy
from data import SYNTHETIC_CLASSES, SyntheticStreets
from entropy import HyperpriorCoder, bits_per_pixel, split_parameters
from evaluate import complexity
from model import HD, PAPER_NETWORKS, SE, DistributedSegmenter, load_checkpoint, save_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_model(decoder="jd", K=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(S=5, F=64, K=K, encoder="resnet18-l2", dilations=(1, 2, 3))
    cfg.update(kw)
    return DistributedSegmenter(decoder, **cfg)


def count(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


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
    cfg = PAPER_NETWORKS[dataset]
    with torch.device("meta"):
        plain = DistributedSegmenter("jd", **{**cfg, "K": 0})
        deployed = DistributedSegmenter("jd", **cfg, deployed=True)
    n_plain = count(plain.hyperprior, plain.JD)
    n_deployed = count(deployed.hyperprior, deployed.JD)
    assert abs(n_deployed - target) / target < 0.01
    assert abs(n_plain - target) / target < 0.01
    F = cfg["F"]
    assert n_deployed == n_plain - 5 * 2 * F + 5 * F  # 5 BNs (gamma, beta) -> 5 biases


def test_complexity_ratios_coco():
    """JD/(SD+D) params in 9..12.5 % and GMACs <= 3.5 % (Table 2); --json keys present."""
    c = complexity("coco")
    for key in ["edge_params", "edge_gmacs", "jd_params", "jd_gmacs", "jd_train_params",
                "ahuja_params", "ahuja_gmacs", "nocomp_params", "nocomp_gmacs"]:
        assert key in c
    assert isinstance(c["jd_params"], int) and isinstance(c["jd_gmacs"], float)
    assert 0.09 <= c["jd_params"] / c["ahuja_params"] <= 0.125
    assert c["jd_gmacs"] / c["ahuja_gmacs"] <= 0.035
    assert c["jd_train_params"] > c["jd_params"]


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
    """Truncated, bit-flipped, wrong-magic, wrong-version, trailing-byte and foreign-model
    strings raise ValueError naming the problem."""
    model, x, strings = coded
    s = strings[0]
    cases = {
        "truncated": s[:-5],
        "header": s[:10],
        "magic": b"JPEG" + s[4:],
        "version": s[:4] + b"\x07" + s[5:],
        "trailing": s + b"\x00",
        "corrupted": s[:40] + bytes([s[40] ^ 0x10]) + s[41:],
    }
    for word, bad in cases.items():
        with pytest.raises(ValueError, match=word):
            model.decompress([bad])
    # every single-bit flip anywhere in the string is caught (CRC32)
    for i in range(0, len(s), 7):
        with pytest.raises(ValueError):
            model.decompress([s[:i] + bytes([s[i] ^ 1]) + s[i + 1:]])
    other = tiny_model("jd", seed=3).eval()
    other.hyperprior.update()
    with pytest.raises(ValueError, match="another model"):
        other.decompress([s])


def test_header_fields(coded):
    """The header records the image size, latent shapes and payload lengths."""
    model, x, strings = coded
    fields = entropy.unpack(strings[0])
    assert fields["image_size"] == (70, 99) and fields["r_size"] == (5, 7)
    assert fields["h_size"] == (2, 2)
    assert len(strings[0]) == entropy.HEADER.size + len(fields["b_h"]) + len(fields["b_r"])
    assert struct.unpack(">H", strings[0][9:11])[0] == 64


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
        est_bits = sum(-torch.log2(q).sum() for q in p.values()).item()
        strings = coder.compress(r, h, (256, 256))
    real_bits = 8 * sum(len(s) - entropy.HEADER.size for s in strings)
    assert abs(real_bits / est_bits - 1) < 0.10, (real_bits, est_bits)


# -----------------------------------------------------------------------------
# data and training

QUICK = ["--max-iters", "4", "--batch-size", "2", "--eval-interval", "2", "--log-interval", "1",
         "--val-limit", "4", "--F", "64", "--K", "1"]


def run_train(*argv, check=True):
    """train.py as a user runs it; returns the completed process (stdout+stderr in .stdout)."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *argv], cwd=HERE,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout
    return proc


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
    checkpoint that rebuilds the model."""
    out = run_train(*QUICK, "--decoder", decoder, "--out-dir", str(tmp_path)).stdout
    assert "final val (4 images): mIoU" in out
    assert ("bpp (real bytes)" in out) == (decoder != "none")
    model, ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 4 and model.decoder == decoder


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


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    """A NaN in the weights makes the loss non-finite: training stops with a message and the
    last good checkpoint is left byte for byte as it was."""
    run_train(*QUICK, "--max-iters", "2", "--out-dir", str(tmp_path))
    path = str(tmp_path / "ckpt.pt")
    ckpt = torch.load(path)
    ckpt["args"]["max_iters"] = 6
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
