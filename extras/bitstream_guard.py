"""
The hostile-input checks of the bitstream container (entropy.py): the reading of its header, and
what keeps CompressAI's rANS coder, which has no bounds checks, from crashing, hanging or reading
past its buffer on any latent the edge may produce and on any byte string the cloud may receive.
entropy.py calls them at each step; a string is then decoded or refused with a ValueError that
says why, in bounded time and memory (tested by a fuzz in a forked process, extras/test_extras.py).

    check_image_size       the work a header may declare: its image size, bounded
    check_value            the container's CRC32, or with a key file its MAC
    unpack                 the header and check value, checked before any decoding
    check_codable          the encoder takes only symbols it can code exactly
    check_payload_length   a payload is whole 32-bit words, at least 8 bytes (as rANS writes)
    rans_decode            decoding inside a zero-padded buffer we own, then re-encoding
    max_container_bytes    the largest legal file, for readers that cap what they read
    read_key               the shared secret of the keyed mode
    main                   what strings of each declared size cost the cloud, side by side

What the CRC protects against: accidental damage (a cut, an extension, flipped bits) and
strings of another model. What it does not: a forger. A CRC is linear, so one captured
string gives away the model id, and a forger can then write strings that this decoder
accepts: flipping the raw bits of an escape-coded value decodes to other masks. Against
that, give edge and cloud the same key file (evaluate.py --key-file): a string made
without the key is then refused. The MAC neither hides the masks nor stops a captured
string from being sent again.
"""
import hmac
import math
import struct
import zlib

import numpy as np
import torch

import entropy

MAC_BYTES = 16  # the keyed check value: HMAC-SHA256 cut to 128 bits
LATENT_LIMIT = 2**20  # |symbol| beyond this is refused: CompressAI's escape coding of a value
#                       needs n_bypass * 4 < 32 bits, or its encoder loops forever


# -----------------------------------------------------------------------------
# reading a container: every check before any decoding


def check_image_size(image_size):
    """The work a string can ask of the cloud follows from the image size its header declares:
    the image, padded to whole 64 x 64 cells of h^'s grid, must have at most P = entropy.MAX_IMAGE_PIXELS
    pixels. That bounds the mask's pixels by P, r^'s positions by P/256 and h^'s by P/4096, those
    of the largest legal image whatever its shape (a 1 x P image would have 16x the positions of
    h^ of a 2048 x 4096 one, and 16x its decoding time)."""
    (H, W), (hh, hw) = image_size, entropy.hyper_size(image_size)
    if not (1 <= H < 2**21 and 1 <= W < 2**21 and 4096 * hh * hw <= entropy.MAX_IMAGE_PIXELS):
        raise ValueError(f"a {H}x{W} image, {64 * hh}x{64 * hw} on h^'s grid of 64x64 cells: the container "
                         f"takes 1 to {entropy.MAX_IMAGE_PIXELS} pixels on that grid (entropy.MAX_IMAGE_PIXELS, "
                         "evaluate.py --max-image-pixels)")


def check_value(model_id, head, payload, key=None):
    """CRC32 (4 bytes) or, with a key, HMAC-SHA256 cut to 16 bytes, over the model id, the
    header before the check value, and the payload."""
    if key is None:
        return struct.pack(">I", zlib.crc32(payload, zlib.crc32(head, zlib.crc32(struct.pack(">I", model_id)))))
    mac = hmac.new(key, struct.pack(">I", model_id), "sha256")
    mac.update(head)
    mac.update(payload)
    return mac.digest()[:MAC_BYTES]


def read_varint(data, pos, name):
    """(value, next position) of a varint of at most 3 bytes (< 2^21) at data[pos], in its one
    (shortest) encoding, so that one set of masks has one string."""
    value = 0
    for k in range(3):
        if pos + k >= len(data):
            raise ValueError(f"truncated bitstream: the header ends inside {name}")
        value |= (data[pos + k] & 0x7F) << (7 * k)
        if not data[pos + k] & 0x80:
            if k and not data[pos + k]:
                raise ValueError(f"malformed header: {name} has a redundant zero byte (not the shortest varint)")
            return value, pos + k + 1
    raise ValueError(f"malformed header: {name} is longer than 3 bytes")


def unpack(data, model_id, N, M, key=None):
    """Parse and check one container for the model `model_id` whose h has N channels and r has
    M; raises ValueError naming what is wrong. Nothing is decoded here; the header is checked
    before the rest of the string is read, and the payload is copied once, if at all."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"expected bytes, got {type(data).__name__}")
    if len(data) < 2:
        raise ValueError(f"truncated bitstream: {len(data)} bytes")
    if data[0] & 0xF0 != entropy.MAGIC:
        raise ValueError(f"not a DSSJ bitstream (format byte {data[0]:#04x}, expected "
                         f"{entropy.MAGIC | entropy.VERSION:#04x})")
    if data[0] & 0x07 != entropy.VERSION:
        raise ValueError(f"bitstream format version {data[0] & 0x07}; this decoder reads version {entropy.VERSION}")
    if bool(data[0] & entropy.KEYED) != (key is not None):
        raise ValueError("bitstream is keyed: decode it with the key file it was written with (--key-file)"
                         if key is None else "bitstream is not keyed, and this decoder takes only strings "
                         "made with its key file")
    if data[1] != model_id & 0xFF:
        raise ValueError(f"bitstream was written by another model (model tag {data[1]:02x}, this decoder's is "
                         f"{model_id & 0xFF:02x}): decode it with the checkpoint that encoded it")
    H, pos = read_varint(data, 2, "the image height")
    W, pos = read_varint(data, pos, "the image width")
    try:  # before k, the lengths' count, depends on them
        check_image_size((H, W))
    except ValueError as e:
        raise ValueError(f"bitstream declares {e}") from None
    names = ["b_h"] + [f"b_r stream {c + 1}" for c in range(entropy.r_streams(M, (H, W)) - 1)]
    lengths = []  # of b_h and of each b_r stream but the last
    for name in names:
        n, pos = read_varint(data, pos, f"the length of {name}")
        lengths.append(n)
    end = pos + (MAC_BYTES if key is not None else 4)
    longest = end + 4 * (M * math.prod(entropy.latent_size((H, W))) + N * math.prod(entropy.hyper_size((H, W))))
    if len(data) > longest:  # no encoder writes more than 4 bytes a symbol (rans_decode)
        raise ValueError(f"bitstream of {len(data)} bytes is longer than any of a {H}x{W} image ({longest})")
    if len(data) < end:
        raise ValueError(f"truncated bitstream: {len(data)} bytes, the header alone is {end}")
    data = bytes(data)  # no copy of bytes
    payload = memoryview(data)[end:]
    if not hmac.compare_digest(check_value(model_id, data[:pos], payload, key), data[pos:end]):
        raise ValueError("corrupted bitstream: the check value does not match (damaged, cut or extended in "
                         "transit" + (", or not made with this key)" if key is not None else ")"))
    # a valid CRC says only that the sender knows our model id (module docstring): the rest is checked too
    streams, start = [], 0
    for name, n in zip(names, lengths):
        if start + n > len(payload):
            raise ValueError(f"malformed header: {name} of {n} bytes, but {len(payload) - start} bytes of "
                             "payload are left")
        streams.append(bytes(payload[start:start + n]))
        start += n
    streams.append(bytes(payload[start:]))  # the last b_r stream: the rest
    for name, b in zip(["b_h"] + ["b_r"] * (len(streams) - 1), streams):
        check_payload_length(name, b)
    return {"image_size": (H, W), "b_h": streams[0], "b_r": streams[1:]}


def check_codable(symbols, name):
    """Refuse symbols that CompressAI's rANS encoder cannot code exactly. A value outside a
    CDF table is escape-coded: a 16-bit escape symbol, then its magnitude in 4-bit groups;
    magnitudes of 2^28 or more make the encoder loop forever, and the encoder writes into a
    buffer of one 32-bit word per symbol, which escape-heavy latents overrun. So every |symbol|
    must be <= LATENT_LIMIT, and an upper bound of the coded size must fit the buffer:
    16 bits a symbol, plus for every nonzero one the escape code of a magnitude 2|s| (which
    bounds its distance to any table's edge, all tables containing 0)."""
    a = symbols.abs().flatten(1)
    if a.max() <= 7 and 24 * a.shape[1] <= 32 * (a.shape[1] - 4):  # the usual case, at once: |symbol| <= 7
        return  # takes at most 24 bits (below); NaN fails the comparison
    if not torch.isfinite(a).all() or a.max() > LATENT_LIMIT:
        raise ValueError(f"cannot code {name} up to {a.max().item():.3g} in magnitude (the coder takes up to "
                         f"{LATENT_LIMIT}): the model is untrained or diverged")
    nibbles = torch.ceil(torch.log2(2 * a + 1) / 4).clamp(min=1)  # 4-bit groups of the magnitude
    bits = 16 + (a > 0) * 4 * (nibbles + 1 + nibbles // 15)  # + the groups' count, 15 per nibble
    if (bits.sum(1) > 32 * (a.shape[1] - 4)).any():  # the encoder's buffer, less its state's 64+ bits
        raise ValueError(f"cannot code {name}: {a.mean().item():.3g} in magnitude on average would overrun "
                         "the rANS encoder's buffer: the model is untrained or diverged")


def check_payload_length(name, b):
    """rANS writes whole 32-bit words, at least two (its final state)."""
    if len(b) < 8 or len(b) % 4:
        raise ValueError(f"payload {name} of {len(b)} bytes cannot be an rANS stream (whole 32-bit "
                         "words, at least 8 bytes): truncated or forged")


def rans_decode(entropy_model, strings, indexes, name):
    """B rANS byte strings -> integer symbols shaped like `indexes` (B, ...), for strings
    that may be hostile. CompressAI's C++ decoder has no bounds checks: it reads two 32-bit
    words to start, at most one a symbol, and for an escape code at most one per 7 bypass
    reads of 4 bits, whose count the stream itself declares. Past the end of the payload we
    give it zero words: there an escape's count can only come from the 64-bit state (at most
    9 groups of 15 before a zero word ends it: 135 bypass reads, at most 21 words), and each
    word of payload can lengthen a count by at most 8 groups (at most 19 words more). So a
    string of n symbols gets 24 zero words a symbol and 20 a payload word: whatever the
    decoder reads lies inside this buffer, which we own. No encoder writes more than a word a
    symbol (its buffer, see check_codable), so a longer payload is refused first, and the
    buffer stays under 45 words a symbol whatever the string. Then the symbols must re-encode
    to exactly the payload: truncated, shifted, extended or forged streams decode to
    something, but never to symbols that re-encode to the same bytes."""
    for s, i in zip(strings, indexes):
        if len(s) > 4 * i.numel():
            raise ValueError(f"payload {name} of {len(s)} bytes is longer than any rANS stream of {i.numel()} "
                             "symbols (4 bytes a symbol): forged")
    tables = [entropy.coder_tables(entropy_model, i) for i in indexes]
    coder = entropy_model.entropy_coder
    decoded = []  # B lists of ints
    for s, i, t in zip(strings, indexes, tables):
        zero_words = 8 + 24 * i.numel() + 20 * (len(s) // 4)
        decoded.append(coder.decode_with_indexes(s.ljust(len(s) + 4 * zero_words, b"\0"), *t))
    symbols = torch.from_numpy(np.array(decoded, dtype=np.int32)).reshape(indexes.shape).float()
    try:  # first the range, so that re-encoding a hostile stream's symbols cannot hang or overrun
        check_codable(symbols, name)
    except ValueError:
        raise ValueError(f"payload {name} decodes to values no encoder of this model writes: "
                         "a forged or damaged bitstream") from None
    if [coder.encode_with_indexes(d, *t) for d, t in zip(decoded, tables)] != list(strings):
        raise ValueError(f"payload {name} is not a whole rANS stream of this model (its symbols re-encode "
                         "to other bytes): truncated, shifted or forged")
    return symbols


def max_container_bytes(N, M, keyed=False):
    """No container the cloud accepts is longer: the encoder writes at most 4 bytes a symbol
    (check_codable), r^ and h^ have at most P/256 and P/4096 positions (P = MAX_IMAGE_PIXELS,
    check_image_size), and each varint of the header has at most 3 bytes."""
    P = entropy.MAX_IMAGE_PIXELS
    k = -(-M * (P // 256) // entropy.STREAM_SYMBOLS)  # b_r's streams at most
    return 4 * (M * (P // 256) + N * (P // 4096)) + 2 + 3 * (3 + k - 1) + (MAC_BYTES if keyed else 4)


def read_key(path):
    """The shared secret of the keyed mode (module docstring): 16 to 1024 bytes from a file,
    the same on edge and cloud (make one with: head -c 32 /dev/urandom > key)."""
    with open(path, "rb") as f:
        key = f.read(1025)
    if not 16 <= len(key) <= 1024:
        raise ValueError(f"key file {path} has {len(key)}{'+' * (len(key) > 1024)} bytes; use 16 to 1024 random "
                         "bytes, e.g. head -c 32 /dev/urandom > key")
    return key


# -----------------------------------------------------------------------------
# what a string can cost the cloud, by the image size its header declares


CHILD = r"""
import resource, sys, time, torch
from model import load_checkpoint
model, _ = load_checkpoint(sys.argv[1])
data = open(sys.argv[2], "rb").read()
for _ in range(2):  # the second run counts: the first also pays for the process's first allocations
    t0 = time.perf_counter()
    try:
        r_hat, size = model.hyperprior.decompress([data])
        t1 = time.perf_counter()
        m = model.cloud(r_hat, size).argmax(1)
        result = "decoded"
    except ValueError as e:
        t1, result = time.perf_counter(), "refused: " + str(e)
    t2 = time.perf_counter()
peak = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]  # this process's
print(t1 - t0, t2 - t0, (peak or [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss])[0] / 1024, result, sep="\t")
"""

SIZES = {"legal": [(2048, 4096), (4096, 2048), (64, 131072), (131072, 64), (1, 131072)],
         "forged": [(2097151, 4), (4, 2097151), (1, 2097151), (16, 524288), (2049, 4096)]}


def strings_by_size(model, out_dir):
    """Files of all-zero latents, as the model's own edge coder writes them, for each size of
    SIZES (the forged ones written past the cap, as a forger would), and of a legal 2048 x 4096
    image whose every symbol is large (|r^| = |h^| = 100, escape-coded)."""
    import os
    hp, P = model.hyperprior, entropy.MAX_IMAGE_PIXELS
    paths = {}
    try:
        entropy.MAX_IMAGE_PIXELS = 2**42  # the edge writes what a forger would
        for kind, sizes in SIZES.items():
            for size in sizes:
                r = torch.zeros(1, hp.M, *entropy.latent_size(size))
                h = torch.zeros(1, hp.N, *entropy.hyper_size(size))
                paths[f"{kind} {size[0]}x{size[1]}"] = hp.compress(r, h, size)[0]
    finally:
        entropy.MAX_IMAGE_PIXELS = P
    sign = lambda n: (torch.arange(n) % 2 * 2 - 1).float()  # noqa: E731  alternating signs
    r = 100 * sign(hp.M * 128 * 256).reshape(1, hp.M, 128, 256)
    h = 100 * sign(hp.N * 32 * 64).reshape(1, hp.N, 32, 64)
    paths["legal 2048x4096, |r^| = |h^| = 100"] = hp.compress(r, h, (2048, 4096))[0]
    for name, s in list(paths.items()):
        paths[name] = os.path.join(out_dir, name.replace(" ", "_").replace("|", "").replace(",", "") + ".dssj")
        with open(paths[name], "wb") as f:
            f.write(s)
    return paths


def main(argv):
    """python evaluate.py --hostile --ckpt CKPT: each string decoded (bytes to masks) in a fresh
    process, its time and peak memory side by side with a legal 2048 x 4096 image's."""
    import argparse
    import os
    import subprocess
    import sys
    import tempfile
    from model import load_checkpoint
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--hostile", action="store_true", required=True)
    p.add_argument("--ckpt", required=True, help="a checkpoint with a coder (JD, Ahuja et al.)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each string: the fastest counts, the largest peak")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    model, _ = load_checkpoint(args.ckpt)
    if model.hyperprior is None:
        raise ValueError(f"{args.ckpt} sends no bitstream")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        paths = strings_by_size(model, tmp)
        runs = {name: [] for name in paths}
        for _ in range(args.repeat):  # in turn, so that a slow spell of the machine hits every string
            for name, path in paths.items():
                out = subprocess.run([sys.executable, "-c", CHILD, args.ckpt, path], cwd=here, check=True,
                                     text=True, stdout=subprocess.PIPE).stdout
                runs[name].append(out.strip().split("\t"))
        rows = [{"string": name, "bytes": os.path.getsize(paths[name]), "entropy_s": min(float(r[0]) for r in rs),
                 "total_s": min(float(r[1]) for r in rs), "peak_mb": max(float(r[2]) for r in rs),
                 "result": rs[0][3][:50]} for name, rs in runs.items()]
    ref = rows[0]
    print(f"{'string':38s} {'bytes':>9s} {'entropy s':>9s} {'x ref':>6s} {'total s':>8s} {'x ref':>6s} "
          f"{'peak MB':>8s} {'x ref':>6s}  result")
    for r in rows:
        r.update({f"{k}_ratio": r[k] / ref[k] for k in ("entropy_s", "total_s", "peak_mb")})
        print(f"{r['string']:38s} {r['bytes']:9d} {r['entropy_s']:9.2f} {r['entropy_s_ratio']:6.2f} "
              f"{r['total_s']:8.2f} {r['total_s_ratio']:6.2f} {r['peak_mb']:8.0f} {r['peak_mb_ratio']:6.2f}  "
              f"{r['result']}")
    print(f"(bytes to masks, the second decoding in a fresh process, the fastest of {args.repeat} such processes "
          "run in turn; entropy: the coder's decompress; peak: the process's peak resident memory; ref: the first row)")
    return rows, args.json
