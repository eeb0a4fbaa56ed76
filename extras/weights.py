"""
Weight files. Any file from outside is read with weights_only=True (tensors and plain
containers, never code) and refused by a one-line ValueError if it is not what it should be
(read_weights, read_checkpoint; model.load_checkpoint uses them). Pretrained weights: E's from
torchvision's weights API (ImageNet ResNets, DeepLabv3 trained on COCO with the VOC classes: the
paper's COCO No Compression model), downloaded once into the torch hub cache
($TORCH_HOME/hub/checkpoints/) as torchvision does; a file already there loads with no network.
Also the head D of a torchvision DeepLabv3 file or a No Compression checkpoint, and the frozen
edge of another checkpoint (train.py --edge-from).
"""
import os

import torch
import torchvision

# -----------------------------------------------------------------------------
# reading any weights file safely


def first_mismatch(error):
    """The first detail line of load_state_dict's RuntimeError (a missing key or a shape)."""
    lines = str(error).splitlines()
    return lines[1].strip() if len(lines) > 1 else str(error)


def read_weights(path):
    """torch.load with weights_only=True: tensors and plain containers, never code, whatever
    the torch version's default. ValueError naming the file if it is not such a file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling hostile bytes can fail in many ways; none may run code
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else "empty or cut short"
        raise ValueError(f"{path} is not a readable PyTorch weights file ({type(e).__name__}: {reason})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    return obj


def read_checkpoint(path):
    """A train.py / reparam.py checkpoint dict ("model", "args", ...), loaded safely."""
    ckpt = read_weights(path)
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("args"), dict):
        what = "a plain state dict" if all(isinstance(v, torch.Tensor) for v in ckpt.values()) else "a dict"
        raise ValueError(f"{path} is {what}, not a checkpoint of train.py or reparam.py (it has no "
                         "'model' and 'args'); a state dict for E goes to --encoder-weights")
    return ckpt


# -----------------------------------------------------------------------------
# pretrained weights, E's and D's

# E's pretrained weights through torchvision's weights API: (source, encoder) -> weights
PRETRAINED = {
    ("imagenet", "resnet50"): torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    ("imagenet", "resnet101"): torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
    ("imagenet", "resnet18-l2"): torchvision.models.ResNet18_Weights.IMAGENET1K_V1,  # its stem, layer1, layer2
    # DeepLabv3 trained on COCO reduced to the 21 VOC classes: the paper's COCO No Compression
    ("deeplabv3-coco", "resnet50"): torchvision.models.segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
    ("deeplabv3-coco", "resnet101"):
        torchvision.models.segmentation.DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1,
}


def pretrained_file(source, encoder):
    """The file of torchvision's weights `source` ("imagenet", "deeplabv3-coco") for `encoder`
    in the torch hub cache ($TORCH_HOME/hub/checkpoints/), downloaded once as torchvision
    does; a file already there loads with no network. ValueError if it cannot be had."""
    weights = PRETRAINED.get((source, encoder))
    if weights is None:
        have = sorted({e for s, e in PRETRAINED if s == source})
        raise ValueError(f"--encoder-weights {source} exists for the encoders {', '.join(have)}, not {encoder}")
    return hub_file(weights.url)


def hub_file(url):
    """The file of `url` in the torch hub cache ($TORCH_HOME/hub/checkpoints/), downloaded once
    as torchvision and CompressAI do; a file already there is used with no network. Its name
    ends in the first hex digits of its SHA-256, checked on download. ValueError if it cannot
    be had."""
    name = os.path.basename(url)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, path, hash_prefix=name.rsplit("-", 1)[1].split(".")[0])
        except Exception as e:  # offline, refused, cut short: the user needs the same three facts
            raise ValueError(f"{name} is not in the torch hub cache and could not be downloaded "
                             f"({type(e).__name__}). Download {url} and put it at {path}") from None
    return path


def load_encoder_weights(encoder, path):
    """Load a state dict into E: a torchvision ResNet (e.g. the ImageNet weights; fc is not
    used), a torchvision DeepLabv3 checkpoint (its "backbone." tensors) or a train.py
    checkpoint (its "E." tensors, e.g. of a No Compression model). Raises ValueError if E's
    tensors are missing or shaped otherwise; returns the keys of the file that E does not use."""
    sd = read_weights(path)
    if isinstance(sd.get("model"), dict):  # a training checkpoint that wraps its state dict
        sd = sd["model"]
    for prefix in ("backbone.", "E."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    ours = encoder.state_dict()
    missing = [k for k in ours if k not in sd]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of E's {len(ours)} tensors, e.g. {missing[:3]}: "
                         "is it a torchvision ResNet / DeepLabv3 state dict?")
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items() if sd[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{path} has tensors shaped otherwise than E's (another --encoder?): {wrong[:3]}")
    encoder.load_state_dict({k: sd[k] for k in ours})
    return [k for k in sd if k not in ours]


# torchvision's DeepLabHead (Sequential: ASPP, 3x3 conv, BN, ReLU, 1x1 classifier) -> our D
DEEPLAB_HEAD = {"classifier.0.convs.0.": "aspp.b0.branches.0.", "classifier.0.convs.4.1.": "aspp.pool.branches.0.0.",
                "classifier.0.convs.4.2.": "aspp.pool.branches.0.1.", "classifier.0.project.": "aspp.project.",
                "classifier.1.": "conv3.0.", "classifier.2.": "conv3.1.", "classifier.4.": "classifier.",
                **{f"classifier.0.convs.{i}.": f"aspp.dilated.{i - 1}.branches.0." for i in (1, 2, 3)}}


def load_deeplab_head(D, path):
    """Load into D the head of a torchvision DeepLabv3 file (its aux classifier dropped) or of
    a train.py checkpoint with a D (a No Compression model, e.g. to fine-tune it on decoded
    images). With E from the same file, the model is that file's. Returns False, loading
    nothing, if the file has no head (e.g. a plain ResNet)."""
    sd, ours = read_weights(path), {}
    if isinstance(sd.get("model"), dict):  # a training checkpoint that wraps its state dict
        sd = sd["model"]
    for k, v in sd.items():
        if k.startswith("D."):
            ours[k[2:]] = v
        prefix = next((p for p in DEEPLAB_HEAD if k.startswith(p)), None)
        if prefix:
            ours[DEEPLAB_HEAD[prefix] + k[len(prefix):]] = v
    if not ours:
        return False
    try:
        D.load_state_dict(ours)
    except RuntimeError as e:
        raise ValueError(f"{path}: its DeepLabv3 head does not fit D (another --F, --head or class count?): "
                         f"{first_mismatch(e)}") from None
    return True


EDGE = ("E", "SE", "hyperprior")  # what makes the bitstreams (HD too: both ends need it)


def load_edge(model, path, args):
    """Load the edge (E, SE, entropy models, HD) of checkpoint `path` into `model`, whose cloud
    decoder then trains on it, frozen: the same bitstreams, another decoder. The rate point
    (alpha) becomes the source's. ValueError where the two do not fit."""
    src = read_checkpoint(path)
    features = ("jd", "ahuja", "inversion")  # the edges that code E's features; jsde, codec code images
    if src["args"]["decoder"] == "none":
        raise ValueError(f"{path}: a No Compression checkpoint has no edge codec")
    if (src["args"]["decoder"] in features) != (args.decoder in features):
        raise ValueError(f"{path}: a {src['args']['decoder']} edge does not make the bitstreams a {args.decoder} "
                         "decoder reads (jd, ahuja, inversion: features; jsde, codec: images)")
    keys = ("dataset", "encoder") + (() if args.decoder in features else ("codec_N", "codec_M"))
    differ = [f"{k} {src['args'].get(k)} (this run: {getattr(args, k)})" for k in keys
              if src["args"].get(k) != getattr(args, k)]
    if differ:
        raise ValueError(f"{path} was trained with other settings: {'; '.join(differ)}")
    # strict=False: the cloud decoder's tensors stay as initialized
    model.load_state_dict({k: v for k, v in src["model"].items() if k.split(".")[0] in EDGE}, strict=False)
    args.alpha = src["args"]["alpha"]  # the rate point is the source's; RD tables list its alpha


def load_nocomp(model, args):
    """Sec. 4.2's start of JD and Ahuja et al.: E, and Ahuja's D, from the trained No Compression
    model of the dataset (a train.py --decoder none checkpoint, or torchvision's DeepLabv3-COCO);
    SE, HD, JD and SD keep their Kaiming start. Returns the line to print."""
    named = args.nocomp_model == "deeplabv3-coco"
    path = pretrained_file("deeplabv3-coco", args.encoder) if named else args.nocomp_model
    cfg = read_weights(path).get("args")
    if isinstance(cfg, dict):  # a train.py checkpoint: the same data and encoder, and No Compression
        want = [("decoder", "none"), ("dataset", args.dataset), ("encoder", args.encoder)]
        differ = [f"{k} {cfg.get(k)} (this run: {v})" for k, v in want if cfg.get(k) != v]
        if differ:
            raise ValueError(f"{path} is not a No Compression model of this run's data and encoder: "
                             f"{'; '.join(differ)}")
    load_encoder_weights(model.E, path)
    if args.decoder == "ahuja" and not load_deeplab_head(model.D, path):
        raise ValueError(f"{path} has no DeepLabv3 head for Ahuja et al.'s D")
    return (f"E{' and D' if args.decoder == 'ahuja' else ''} from the No Compression model {path}, "
            f"{'frozen (as [1])' if args.freeze_encoder else 'trained on'}")


def init_encoder(model, args):
    """E's start from --encoder-weights (a torchvision name or a file); for No Compression the
    file's DeepLabv3 head too (torchvision's DeepLabv3-COCO as it is, or a trained model to
    fine-tune on decoded images); for JSDE its ResNet stages. Returns the line to print."""
    named = (args.encoder_weights, args.encoder) in PRETRAINED  # torchvision's, or a file
    path = pretrained_file(args.encoder_weights, args.encoder) if named else args.encoder_weights
    ignored = load_encoder_weights(model.JSDE.layers if args.decoder == "jsde" else model.E, path)
    whole = args.decoder == "none" and load_deeplab_head(model.D, path)
    if whole and args.encoder_weights == "deeplabv3-coco":
        ignored = ["aux_classifier.*"]
    more = f" and {len(ignored) - 4} more" if len(ignored) > 4 else ""
    return (f"{'E and D' if whole else 'JSDE stages' if args.decoder == 'jsde' else 'E'} initialized from {path}; "
            f"keys not used: {', '.join(ignored[:4]) or 'none'}{more}")
