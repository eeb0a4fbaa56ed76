"""
train.py's options for the systems beyond the method, used only when a run asks for one:
--decoder codec / jsde / inversion, --image-codec (Fig. 1a's fine-tuning on decoded images),
--edge-from (a new cloud decoder on another run's frozen edge), and every run's start from
weights (--encoder-weights, JSDE's codec).

    configure(args, cli)   their defaults and checks: a one-line error, or None
    start(model, args)     the starting weights of a new run (E from the No Compression model too)
    decoded_images(x, codec)       Fig. 1a: each image coded and decoded at a random quality
    image_distortion(x_hat, x)     255^2 * MSE for the clouds that rebuild the image
"""
import torch

from data import preset


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
             "--image-codec fine-tunes the No Compression model of a conventional pipeline: use it with --decoder none"),
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


def start(model, args):
    """A new run's starting weights, by its settings: JSDE's image codec (Sec. 4.2: a trained
    one), E's (--encoder-weights), or another run's frozen edge (--edge-from). Returns the lines
    to print; ValueError naming the flag whose file does not fit."""
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
        raise ValueError(f"{flag}: {e}") from None
    return lines


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

