"""
What goes beyond the method: one concept per file. The method's files (model.py, entropy.py,
reparam.py, data.py, evaluate.py) never import this folder at module level; train.py imports
train_options.py (its flags resolved and checked), and both import the rest inside the modes
that need it.

    image_codecs.py     Fig. 1a's conventional pipelines: JPEG, WebP, AVIF, HEVC, a learned codec
    learned_codec.py    the project's learned image codec (scale hyperprior), train.py --decoder codec
    jsde.py             Fig. 1b: Torfason et al.'s JSDE on that codec, train.py --decoder jsde
    privacy.py          the data-protection test: an attacker's image decoder, evaluate.py --privacy
    image_quality.py    255^2 MSE, PSNR, SSIM for the clouds that rebuild images
    pictures.py         Fig. 6's pictures (evaluate.py --save-vis), the attack's layout
    rd_claims.py        the paper's RD claims and the ablations as numbers, printed by evaluate.py --rd
    complexity.py       Tables 2 and 4 counted: evaluate.py --complexity
    fast_cloud.py       the deployed cloud's fast path (the same masks): evaluate.py --fast, the benchmark
    benchmark.py        JD vs Ahuja et al.'s cloud and training steps timed: evaluate.py --benchmark
    bitstream_guard.py  the container's hostile-input checks (its header read: unpack), called by
                        entropy.py; the check value and the keyed mode (the key file);
                        what each declared size costs: evaluate.py --hostile
    weights.py          weight files read safely (model.load_checkpoint's checks); pretrained
                        weights (torchvision's API, the hub cache); --edge-from
    train_options.py    train.py's flags resolved and checked (presets, --resume, the protocol's
                        stage 1), and the options of these systems: defaults, starting weights
    test_extras.py      their tests, run with test_all.py by `python -m pytest -q`
"""
