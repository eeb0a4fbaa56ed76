"""
Train a distributed segmenter end to end on the rate-distortion loss of Eq. (3),
    J = alpha * cross-entropy + (1 - alpha) * bits per pixel (Eq. 1),
then evaluate it on the val set through real bitstreams.

    python train.py                                   # built-in synthetic streets -> out/synthetic/
    python train.py --alpha 0.3 --out-dir runs/jd_a0.3               # another rate
    python train.py --decoder ahuja --out-dir runs/ahuja_a0.6        # Ahuja et al.'s SD + D
    python train.py --decoder none --out-dir runs/none               # No Compression (CE only)
    python train.py --resume out/synthetic/ckpt.pt    # continue exactly where it stopped
    torchrun --standalone --nproc_per_node 2 train.py --max-iters 20   # DDP (gloo on CPU, nccl on GPUs)
    python train.py --dataset cityscapes --K 3 --print-config          # Suppl. Table 3, resolved

extras/train_options.py resolves and checks the flags, and holds the options of the systems
beyond the method that train here too (--decoder codec, jsde, inversion; --image-codec; --edge-from).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.functional import cross_entropy
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from data import DATASETS, get_dataset, val_dataset
from entropy import bits_per_pixel, split_parameters
from evaluate import evaluate, quality
from extras import train_options  # the flags resolved and checked; the options beyond the method
from model import DECODERS, build_model, save_checkpoint

if hasattr(sys.stdout, "reconfigure"):
    sys.stdout.reconfigure(line_buffering=True)  # log lines appear at once, also through a pipe

# -----------------------------------------------------------------------------
# config: the dataset's preset (data.PRESETS: the demo's column and Suppl. Table 3's), else
# DEFAULTS; only the flags you give override them; --help shows both.

DEFAULTS = dict(dataset="synthetic", data_root=None, val_limit=None, decoder="jd", edge_from=None,
                image_codec=None, learned_codec=None, codec_weights=None, clip=1.0, resume=None, seed=0,
                device=None, amp=False, compile=False)

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            argument_default=argparse.SUPPRESS)  # parsed = only the flags given
flag = train_options.flag_adder(p, DEFAULTS)  # p.add_argument; the help ends with the defaults, the presets'

# data
flag("--dataset", "data and paper preset", choices=DATASETS)
flag("--data-root", "dataset folder (real datasets; default data/<dataset>)")
flag("--crop", "random square training crop of the real datasets, 0 = whole image", type=int)
flag("--size", "synthetic scene size; the real datasets use --crop", type=int, nargs=2, metavar=("H", "W"))
flag("--val-limit", "validate on the first N val images only (quick checks)", type=int)
# model
flag("--decoder", "the system: jd (ours, Fig. 1d), ahuja (Fig. 1c), none (No Compression), jsde (Torfason et "
     "al., Fig. 1b), codec (the learned image codec of Fig. 1a, on J = alpha*255^2*MSE + (1-alpha)*bpp), "
     "inversion (an attacker's image decoder on a frozen jd/ahuja edge, MSE)", choices=DECODERS)
flag("--encoder", "image encoder E", choices=["resnet50", "resnet101", "resnet18-l2"])
flag("--K", "JD's over-parameterization repetitions, 0 = plain ASPP (Fig. 4)", type=int)
flag("--F", "ASPP width (JD and D)", type=int)
flag("--dilations", "JD's ASPP dilations", type=int, nargs=3)
flag("--head", "DeepLabv3 head D of the baselines", choices=["torchvision", "mmseg"])
flag("--nocomp-model", "jd, ahuja: E (Ahuja et al.: and D) start from this trained No Compression model, Sec. 4.2: "
     "a train.py --decoder none checkpoint (the demo trains it first if missing), deeplabv3-coco (torchvision's), "
     "or none (E from --encoder-weights instead, trained jointly: not the paper's protocol)")
flag("--freeze-encoder", "jd, ahuja: keep that E (and D) fixed, as [1]; --no-freeze-encoder trains them on",
     action=argparse.BooleanOptionalAction)
flag("--encoder-weights", "E's start in a No Compression run (jsde: its ResNet stages'): imagenet or deeplabv3-coco "
     "(torchvision's weights, downloaded once into $TORCH_HOME/hub/checkpoints), none (random), or a ResNet / "
     "DeepLabv3 state dict or train.py checkpoint (with --decoder none, a file's DeepLabv3 head goes into D too)")
train_options.add_flags(flag)  # the systems beyond the method: --edge-from, --image-codec, --codec-*
# rate
flag("--alpha", "RD trade-off of Eq. (3), in (0, 1]; higher = more bits", type=float)
# optim
flag("--max-iters", "training iterations tau_max", type=int)
flag("--epochs", "instead of --max-iters: passes over the training set", type=int)
flag("--batch-size", "effective batch, split over processes", type=int)
flag("--lr", "initial learning rate, main optimizer", type=float)
flag("--lr-aux", "initial learning rate, aux optimizer (quantiles)", type=float)
flag("--clip", "gradient clipping by norm", type=float)
# system
flag("--out-dir", "where ckpt.pt and metrics.json go")
flag("--resume", "checkpoint to continue from")
flag("--seed", "seed of the data order, initialization and noise", type=int)
flag("--device", "cpu, cuda, cuda:1, ... (default: cuda if available)")
flag("--amp", "bfloat16 autocast (the entropy models stay float32)", action="store_true")
flag("--compile", "torch.compile the model", action="store_true")
flag("--eval-interval", "validate and checkpoint every N iterations", type=int)
flag("--log-interval", "log every N iterations", type=int)
flag("--num-workers", "DataLoader worker processes", type=int)
p.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")

cli = vars(p.parse_args())
args, ckpt = train_options.resolve(cli, DEFAULTS)  # preset, --resume, the protocol's defaults, checks

# -----------------------------------------------------------------------------
# processes and devices

ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun?
if ddp:
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
else:
    rank, world_size = 0, 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
master = rank == 0  # only rank 0 logs and saves
device_type = "cuda" if device.startswith("cuda") else "cpu"
batch = train_options.per_process_batch(args.batch_size, world_size)  # the effective batch stays the preset's

# -----------------------------------------------------------------------------
# stage 1 (Sec. 4.2): the No Compression model that JD and Ahuja et al. start from. The demo trains
# its own the first time, with this run's data, network and schedule flags; the real datasets name the command.

if args.nocomp_model not in (None, "none", "deeplabv3-coco") and not os.path.isfile(args.nocomp_model):
    train_options.make_nocomp_model(args, cli, ddp, os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# data

try:
    train_ds = get_dataset(args.dataset, "train", args.data_root, args.crop, args.seed, args.size)
    val_ds, _ = val_dataset(vars(args), limit=args.val_limit)  # its first --val-limit images if given
except (ValueError, FileNotFoundError) as e:  # missing data: the message shows the layout
    sys.exit(str(e))
if args.epochs and "max_iters" not in cli:  # COCO's recipe counts epochs
    args.max_iters = args.epochs * (len(train_ds) // args.batch_size)


def train_batches(start_iter):
    """Index batches for iterations start_iter, start_iter + 1, ...: DistributedSampler
    shards each epoch's permutation over the processes; a batch depends only on (seed,
    iteration), so resuming continues the same sequence. Keys are (index, epoch) so that
    datasets can draw their augmentation from them."""
    sampler = DistributedSampler(train_ds, world_size, rank, shuffle=True, seed=args.seed, drop_last=True)
    per_epoch = len(sampler) // batch
    if per_epoch == 0:
        sys.exit(f"the training set has {len(train_ds)} images: fewer than one batch per process")
    epoch, k = divmod(start_iter, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)
        for j in range(k, per_epoch):
            yield [(i, epoch) for i in order[j * batch:(j + 1) * batch]]
        epoch, k = epoch + 1, 0


# -----------------------------------------------------------------------------
# model and optimizers

torch.manual_seed(args.seed)
model = build_model(vars(args))
if not args.resume:  # E from the No Compression model (Sec. 4.2) or other weights, JSDE's codec, another edge
    train_options.start(model, args, master)
frozen = train_options.frozen_edge(model) if args.edge_from else []  # E, SE, coder: another run's
if args.freeze_encoder:  # [1]'s setup: the No Compression model's E (and Ahuja's D) fixed, only the new parts train
    frozen += [model.E] + ([model.D] if args.decoder == "ahuja" else [])
for m in frozen:
    m.requires_grad_(False)  # no gradient, so autograd records nothing in E: its forward runs without a graph
model = model.to(device)
if ddp and device_type == "cuda":  # BN statistics over all GPUs' images, not 2 per GPU
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
compress = model.hyperprior is not None
if compress:
    main_params, aux_params = split_parameters(model)  # aux = EntropyBottleneck.quantiles
else:
    main_params, aux_params = list(model.parameters()), []
main_params, aux_params = [[p for p in ps if p.requires_grad] for ps in (main_params, aux_params)]
optimizer = torch.optim.Adam(main_params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0)
aux_optimizer = torch.optim.Adam(aux_params, lr=args.lr_aux, betas=(0.9, 0.99), weight_decay=0) if aux_params else None
iter_num = 0
if args.resume:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if aux_optimizer:
        aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
    iter_num = ckpt["iter_num"]
    del ckpt
raw_model = model  # the unwrapped model, for saving, the aux loss and evaluation
if args.compile:
    model = torch.compile(model)
if ddp:
    # the quantiles get no gradient from J (only from the aux loss, identical on every rank)
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None,
                find_unused_parameters=compress)


def get_lr(lr0, it):
    """Polynomial decay, Suppl. Eq. (4): eta0 * (1 - tau / tau_max)^0.9."""
    return lr0 * (1 - it / args.max_iters) ** 0.9


def checkpoint():
    save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "aux_optimizer": aux_optimizer.state_dict() if aux_optimizer else None,
                     "iter_num": iter_num, "args": vars(args)}, os.path.join(args.out_dir, "ckpt.pt"))


# -----------------------------------------------------------------------------
# training loop

if master:
    train_options.check_out_dir(args.out_dir)
    n_params = sum(p.numel() for p in raw_model.parameters())
    print(f"{args.decoder} on {args.dataset}: {n_params / 1e6:.2f} M parameters, {world_size} process(es) "
          f"on {device}, batch {args.batch_size}, {args.max_iters} iterations from {iter_num}")
cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
if iter_num < args.max_iters:  # evaluation alone (--max-iters 0) needs no training batch
    batches = iter(DataLoader(train_ds, batch_sampler=train_batches(iter_num), pin_memory=device_type == "cuda",
                              num_workers=min(args.num_workers, cores)))  # no more workers than cores
t0 = time.time()
while iter_num < args.max_iters:
    model.train()
    for m in frozen:  # frozen modules keep their BN statistics (and a frozen edge codes by rounding)
        m.eval()
    for opt, lr0 in [(optimizer, args.lr), (aux_optimizer, args.lr_aux)]:
        for group in opt.param_groups if opt else []:
            group["lr"] = get_lr(lr0, iter_num)
    x, y = next(batches)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    # the noise of the rate model and dropout depend on (seed, rank, iteration) only: exact resume
    torch.manual_seed(int(np.random.SeedSequence([args.seed, rank, iter_num]).generate_state(1)[0]))
    if args.image_codec:  # Fig. 1a: the cloud sees decoded images, each at a random quality
        x = train_options.decoded_images(x, args.image_codec)

    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.amp):
        out = model(x)
    if raw_model.image_out:  # codec, inversion: 255^2 * MSE in the CE's place
        distortion, shown = train_options.image_distortion(out["x_hat"], x)
    else:
        distortion = cross_entropy(out["logits"].float(), y, ignore_index=255)  # J_dist, Eq. (2)
        shown = f"CE {distortion.item():.4f}"
    if compress:
        bpp = bits_per_pixel(out["likelihoods"], x.shape[0] * x.shape[2] * x.shape[3])  # J_rate, Eq. (1)
        loss = args.alpha * distortion + (1 - args.alpha) * bpp  # J, Eq. (3)
        if args.edge_from:  # a frozen edge: the rate cannot change, J reduces to the distortion
            loss = distortion
    else:  # No Compression: the cross-entropy alone
        bpp, loss = torch.zeros(()), distortion
    finite = torch.isfinite(loss.detach()).float()
    if ddp:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank stops together
    if finite.item() < 1:
        if master:
            print(f"non-finite loss at iteration {iter_num} ({shown}, bpp {bpp.item()}): stopping. "
                  f"The last good checkpoint in {args.out_dir} is untouched; resume from it with a lower "
                  f"--lr, or without --amp.", file=sys.stderr)
        sys.exit(1)

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(main_params, args.clip)
    optimizer.step()
    if aux_optimizer:  # the aux loss fits the quantiles of h's factorized prior (CompressAI)
        aux_optimizer.zero_grad(set_to_none=True)
        raw_model.hyperprior.aux_loss().backward()
        aux_optimizer.step()
    iter_num += 1

    if master and (iter_num % args.log_interval == 0 or iter_num == 1):
        dt = (time.time() - t0) / (args.log_interval if iter_num > 1 else 1)
        print(f"iter {iter_num}: loss {loss.item():.4f}, {shown}, bpp {bpp.item():.4f}, "
              f"lr {get_lr(args.lr, iter_num - 1):.2e}, {1000 * dt:.0f} ms/iter")
        t0 = time.time()
    if iter_num % args.eval_interval == 0 or iter_num == args.max_iters:
        m = evaluate(raw_model, val_ds, device, real_bits=False, rank=rank, world_size=world_size)
        if master:
            bpp_est = f", bpp (likelihoods) {m['bpp_est']:.4f}" if compress else ""
            checkpoint()
            print(f"val at iter {iter_num}: {quality(m)}{bpp_est} (checkpoint saved)")
        t0 = time.time()

# -----------------------------------------------------------------------------
# final evaluation through real bitstreams: edge -> bytes -> cloud

if compress:
    raw_model.hyperprior.update(force=True)  # CDF tables for the coder, saved with the model
m = evaluate(raw_model, val_ds, device, real_bits=True, rank=rank, world_size=world_size)
if master:
    checkpoint()
    line = f"final val ({m['n_images']} images): {quality(m)}"
    if compress and "refused" in m:
        line += f" (eval forward), bpp (likelihoods) {m['bpp_est']:.4f}; no bitstream: {m['refused']}"
    elif compress:
        line += (f", bpp (real bytes) {m['bpp_real']:.4f}, bpp (likelihoods) {m['bpp_est']:.4f}"
                 f", ratio {m['bpp_real'] / m['bpp_est']:.3f}")
    print(line)
    print(f"checkpoint: {os.path.join(args.out_dir, 'ckpt.pt')}")
    with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
        json.dump({**m, "classes": list(train_ds.classes), "args": vars(args)}, f, indent=2)
if ddp:
    dist.barrier()  # let rank 0 finish writing before any process tears the group down
    dist.destroy_process_group()
