"""
The hostile-input checks of the bitstream container (entropy.py): what keeps CompressAI's rANS
coder, which has no bounds checks, from crashing, hanging or reading past its buffer on any
latent the edge may produce and on any byte string the cloud may receive. entropy.py calls
them at each step; a string is then decoded or refused with a ValueError that says why, in
bounded time and memory (tested by a fuzz in a subprocess, extras/test_extras.py).

    check_codable          the encoder takes only symbols it can code exactly
    check_payload_length   a payload is whole 32-bit words, at least 8 bytes (as rANS writes)
    rans_decode            decoding inside a zero-padded buffer we own, then re-encoding
    max_container_bytes    the largest legal file, for readers that cap what they read
"""
import numpy as np
import torch

import entropy

LATENT_LIMIT = 2**20  # |symbol| beyond this is refused: CompressAI's escape coding of a value
#                       needs n_bypass * 4 < 32 bits, or its encoder loops forever


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


def max_container_bytes(N, M):
    """No container of an image of at most MAX_IMAGE_PIXELS = P pixels is longer: the encoder
    writes at most 4 bytes a symbol (check_codable), a 1 x P image has the most latent
    positions (ceil(P/16) of r^, ceil(P/64) of h^), and a header varint has at most 3 bytes."""
    P = entropy.MAX_IMAGE_PIXELS
    return 4 * (M * -(-P // 16) + N * -(-P // 64)) + 2 + 3 * (3 + entropy.r_streams(M, (1, P))) + 4
