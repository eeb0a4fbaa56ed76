"""
train.py's settings beyond the method: the flags given, resolved and checked; the paper's
two-stage protocol's first stage for the demo; and the options of the systems beyond the method
(--decoder codec / jsde / inversion, --image-codec: Fig. 1a's fine-tuning on decoded images,
--edge-from: a new cloud decoder on another run's frozen edge) and every run's starting weights.

    flag_adder(p, defaults)           train.py's flag(): its help ends with the defaults, the presets'
    add_flags(flag)                   the flags of the systems beyond the method
    resolve(cli, defaults)            (args, ckpt): the settings, every check a one-line error
    make_nocomp_model(args, cli, ddp, script)   stage 1: the demo trains its No Compression model
    per_process_batch(batch_size, world_size)   DDP: each process's share of the batch, checked
    check_out_dir(path)               a place to write, checked before any training
    start(model, args, master)        the starting weights of a new run (E from the No Compression model too)
    frozen_edge(model)                --edge-from: the modules that stay as another run trained them
    decoded_images(x, codec)          Fig. 1a: each image coded and decoded at a random quality
    image_distortion(x_hat, x)        255^2 * MSE for the clouds that rebuild the image
"""
import argparse
import json
import os
import subprocess
import sys

import torch

from data import DATASETS, PRESETS, preset
from extras.weights import read_checkpoint
from model import EXTRA_SYSTEMS, MODEL_KEYS


def flag_adder(p, defaults):
    """train.py's flag(name, help, **kw): p.add_argument, with the help ending in the flag's
    default, and the presets' where they differ (data.PRESETS), or its entry in `defaults`."""
    def flag(name, help, **kw):
        key = name[2:].replace("-", "_")
        if key in PRESETS:
            demo, *paper = ("none" if v is None else v for v in PRESETS[key])
            others = [f"{d} {v}" for d, v in zip(DATASETS[1:], paper) if v != demo]
            help += f" (default {demo}" + (f"; {', '.join(others)}" if others else "") + ")"
        elif key in defaults and defaults[key] is not None and defaults[key] is not False:
            help += f" (default {defaults[key]})"
        p.add_argument(name, help=help.replace("%", "%%"), **kw)
    return flag


def add_flags(flag):
    """train.py's flags for the systems beyond the method; `flag` is train.py's flag()."""
    flag("--edge-from", "train only a new cloud decoder, on the frozen edge (E, SE, coder, HD) of this checkpoint")
    flag("--image-codec", "No Compression fine-tuned on images decoded by this codec (jpeg, webp, avif, hevc, "
         "learned) at random qualities (Fig. 1a), from the No Compression model (default: --nocomp-model's)")
    flag("--learned-codec", "with --image-codec learned: train.py --decoder codec checkpoints, one per rate",
         nargs="+")
    flag("--codec-N", "the image codec's (codec, jsde) hyper-latent channels N", type=int)
    flag("--codec-M", "the image codec's (codec, jsde) latent channels M", type=int)
    flag("--codec-weights", "jsde: the image codec's start, a --decoder codec checkpoint or a CompressAI state "
         "dict (default: out/<dataset>_codec/ckpt.pt if there)")


def resolve(cli, defaults):
    """train.py's settings from the flags given (`cli`): a new run's are `defaults`, then the
    dataset's preset, then the flags; a resumed run's come from its checkpoint, whose model
    settings may not change. Then the defaults of the paper's protocol (Sec. 4.2) and every
    check: a user error ends the run with one line. --print-config prints the result and exits.
    Returns (args, the --resume checkpoint or None)."""
    print_config, ckpt = cli.pop("print_config", False), None
    if "resume" in cli:  # settings come from the checkpoint; the model's may not change
        try:
            ckpt = read_checkpoint(cli["resume"])
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"--resume: {e}")
        if ckpt["args"].get("deployed"):
            sys.exit(f"{cli['resume']} is a deployed (fused) checkpoint for inference; resume from the training one")
        differ = [f"--{k.replace('_', '-')} {cli[k]} (checkpoint: {ckpt['args'].get(k)})"
                  for k in MODEL_KEYS + ("dataset", "size") if k in cli and cli[k] != ckpt["args"].get(k)]
        if differ:
            sys.exit(f"cannot resume {cli['resume']}: it was trained with other settings: {'; '.join(differ)}")
        # defaults and the preset first: settings added since the checkpoint was saved (E then trained jointly)
        config = {**defaults, **preset(ckpt["args"]["dataset"]), "nocomp_model": None, "freeze_encoder": False,
                  **ckpt["args"], **cli}
    else:
        config = {**defaults, **preset(cli.get("dataset", defaults["dataset"])), **cli}
    args = argparse.Namespace(**config)
    if args.decoder in EXTRA_SYSTEMS or any(getattr(args, k) for k in ("edge_from", "image_codec", "learned_codec",
                                                                       "codec_weights")):
        error = configure(args, cli)  # a system or option beyond the method: its defaults and checks
        if error:
            sys.exit(error)
    if args.dataset != "synthetic" and "size" in cli:
        sys.exit("--size sets the synthetic scenes' size; the real datasets take --crop")
    if not args.resume:  # the paper's protocol (Sec. 4.2): JD and Ahuja et al. start from the No Compression model
        coder = args.decoder in ("jd", "ahuja") and not args.edge_from
        if coder and "encoder_weights" in cli and "nocomp_model" not in cli:
            args.nocomp_model = "none"  # E's start given: from there, trained jointly
        if not coder or args.nocomp_model == "none":
            if cli.get("freeze_encoder"):
                sys.exit("--freeze-encoder keeps the No Compression model's E fixed: use it with --nocomp-model")
            args.nocomp_model, args.freeze_encoder = args.nocomp_model if coder else None, False
        if args.decoder == "none" and "out_dir" not in cli and not args.image_codec:
            args.out_dir += "_none"  # out/synthetic_none: where the feature coders look for it
    for bad, message in [  # user errors: one line each, before anything is built
            (not 0 < args.alpha <= 1, f"--alpha {args.alpha}: must be in (0, 1]; Eq. (3) weighs the CE by alpha"),
            (args.K < 0, f"--K {args.K}: the branches per sub-block must be 0 (plain ASPP) or more"),
            (args.decoder == "jd" and args.F % 64, f"--F {args.F}: JD's DWUpConv has 64 groups, so F must be a "
                                                   "multiple of 64"),
            (args.max_iters is not None and args.max_iters < 0, f"--max-iters {args.max_iters}: must be 0 or more"),
            (args.epochs is not None and args.epochs < 1, f"--epochs {args.epochs}: must be 1 or more"),
            (args.batch_size < 1, f"--batch-size {args.batch_size}: must be 1 or more"),
            (args.lr <= 0 or args.lr_aux <= 0, "--lr and --lr-aux must be positive"),
            (args.eval_interval < 1 or args.log_interval < 1, "--eval-interval and --log-interval must be 1 or more")]:
        if bad:
            sys.exit(message)
    if print_config:
        print(json.dumps(vars(args), indent=2))
        print("fixed in the code: Adam betas (0.9, 0.99), weight decay 0, poly LR power 0.9, Kaiming init"
              + ("; max_iters = epochs * (training images // batch)" if args.epochs else ""))
        sys.exit(0)
    return args, ckpt


def make_nocomp_model(args, cli, ddp, script):
    """Stage 1 of the protocol where --nocomp-model names a file not yet there: the demo trains
    it with `script` (train.py --decoder none) and this run's data, network and schedule flags;
    a real dataset (or a DDP run) is told the command instead."""
    make = ["--dataset", args.dataset, "--decoder", "none", "--out-dir", os.path.dirname(args.nocomp_model)]
    if args.dataset != "synthetic" or ddp:
        sys.exit(f"--nocomp-model {args.nocomp_model}: not there. JD and Ahuja et al. start from the trained No "
                 f"Compression model (Sec. 4.2): make it first with python train.py {' '.join(make)}")
    for k in ("size", "val_limit", "encoder", "F", "head", "max_iters", "epochs", "batch_size", "lr", "lr_aux",
              "clip", "device", "amp", "compile", "eval_interval", "log_interval", "num_workers"):
        v = cli.get(k)
        make += [] if v is None or v is False else [f"--{k.replace('_', '-')}"] + \
            ([] if v is True else [str(x) for x in (v if isinstance(v, list) else [v])])
    check_out_dir(args.out_dir)
    print(f"stage 1: the No Compression model, python train.py {' '.join(make)}")
    if subprocess.run([sys.executable, script, *make]).returncode:
        sys.exit(f"stage 1 failed: the No Compression model is not at {args.nocomp_model}")
    print(f"stage 2: {args.decoder} from {args.nocomp_model}")


def per_process_batch(batch_size, world_size):
    """Each process's share of the batch; one line if it does not divide or is too small."""
    if batch_size % world_size:
        sys.exit(f"--batch-size {batch_size} must divide over {world_size} processes")
    if batch_size // world_size < 2:
        sys.exit("each process needs a batch of at least 2: BatchNorm after ASPP's global pooling "
                 "sees one value per channel and image")
    return batch_size // world_size


def check_out_dir(path):
    """A place to write, checked before any training: one line if there is none."""
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, ".write_test"), "w"):
            pass
        os.remove(os.path.join(path, ".write_test"))
    except OSError as e:
        sys.exit(f"--out-dir {path}: cannot write there ({e.strerror or e})")


def configure(args, cli):
    """Fill in the defaults of these options and check them; returns a user error or None."""
    fresh = "resume" not in cli
    if "out_dir" not in cli and fresh and args.decoder in ("jsde", "codec", "inversion"):
        args.out_dir = f"{preset(args.dataset)['out_dir']}_{args.decoder}"  # out/synthetic_codec, where jsde looks
    if args.image_codec and fresh:  # Fig. 1a: fine-tune the dataset's No Compression model, not overwrite it
        args.out_dir = cli.get("out_dir", f"{preset(args.dataset)['out_dir']}_none_{args.image_codec}")
        args.encoder_weights = cli.get("encoder_weights", preset(args.dataset)["nocomp_model"])
    if args.decoder == "codec" and "alpha" not in cli and fresh:
        args.alpha = 0.01  # the presets' alpha weighs a CE; for 255^2 * MSE, CompressAI's lambda ~ 0.0067-0.013
    for bad, message in [
            (not fresh and "edge_from" in cli,
             "--edge-from starts a run; --resume continues one with the edge setting it was started with"),
            (args.edge_from and args.decoder == "none",
             "--edge-from trains a decoder of bitstreams: use it with --decoder jd, ahuja or inversion"),
            (args.decoder == "inversion" and not args.edge_from and fresh,
             "--decoder inversion attacks a trained edge: give its checkpoint with --edge-from"),
            (args.edge_from and ("encoder_weights" in cli or "alpha" in cli),
             "--edge-from brings the whole edge and its rate point: drop --encoder-weights and --alpha"),
            (args.image_codec and args.decoder != "none",
             "--image-codec fine-tunes a conventional pipeline's No Compression model: use it with --decoder none"),
            (args.learned_codec and args.image_codec != "learned", "--learned-codec goes with --image-codec learned")]:
        if bad:
            return message
    if args.image_codec:
        from extras import image_codecs
        try:
            if args.learned_codec:
                image_codecs.use_learned_codecs(args.learned_codec)
            image_codecs.image_codec_format(args.image_codec)  # unknown, or HEVC's package missing: one line
        except ValueError as e:
            return f"--image-codec: {e}"
    return None


def start(model, args, master=True):
    """A new run's starting weights, by its settings: JSDE's image codec (Sec. 4.2: a trained
    one), E's (the No Compression model's, or --encoder-weights), or another run's frozen edge
    (--edge-from). Prints what it loaded (on rank 0); a file that does not fit ends the run with
    one line naming its flag."""
    from extras.weights import init_encoder, load_edge, load_nocomp
    lines = []
    try:
        flag = "--codec-weights"
        if args.decoder == "jsde" and not args.edge_from:
            from extras.jsde import start_from_codec
            lines.append(start_from_codec(model, args, f"{preset(args.dataset)['out_dir']}_codec"))
        flag = "--nocomp-model"
        nocomp = args.nocomp_model not in (None, "none")
        if nocomp:
            lines.append(load_nocomp(model, args))
        flag = "--encoder-weights"
        if not args.edge_from and not nocomp and args.encoder_weights != "none" and args.decoder != "codec":
            lines.append(init_encoder(model, args))
        elif not args.edge_from and not nocomp and args.dataset != "synthetic" and args.decoder != "codec":
            lines.append("E starts from random weights (--encoder-weights none): far from the paper's pretrained E")
        flag = "--edge-from"
        if args.edge_from:
            load_edge(model, args.edge_from, args)
            lines.append(f"edge (E, SE, entropy models) from {args.edge_from}, frozen: only the cloud decoder trains")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"{flag}: {e}")
    for line in lines if master else []:
        print(line)


def frozen_edge(model):
    """--edge-from: the modules that make the bitstreams (E, SE, the coder with HD: both ends need it)."""
    from extras.weights import EDGE
    return [getattr(model, name) for name in EDGE if hasattr(model, name)]


def decoded_images(x, codec):
    """Fig. 1a's fine-tuning: the cloud sees each image coded and decoded at a random quality."""
    from extras.image_codecs import IMAGE_CODECS, code_images
    qualities = IMAGE_CODECS[codec][2]
    return torch.cat([code_images(xi[None], codec, qualities[torch.randint(len(qualities), ())])[0] for xi in x])


def image_distortion(x_hat, x):
    """The distortion of a cloud that rebuilds the image, in the CE's place in Eq. (3): 255^2 *
    MSE (CompressAI's recipe); and its PSNR for the log."""
    from extras.image_quality import image_mse
    mse = image_mse(x_hat.float(), x).mean()
    return 255**2 * mse, f"PSNR {-10 * torch.log10(mse).item():.2f} dB"
