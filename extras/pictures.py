"""
Fig. 6's pictures: image | ground truth | prediction decoded from the bitstream, with titles and
a colour legend (evaluate.py --save-vis); label_picture also lays out the attack's pictures
(extras/privacy.py).
"""
import os

import torch
from PIL import Image, ImageDraw, ImageFont

from data import colorize, denormalize


def label_picture(panels, titles, classes=None, palette=None):
    """Panels side by side under their titles, with a colour legend of the classes below
    (none if classes is None)."""
    H, W = panels[0].shape[:2]
    font = ImageFont.load_default()
    entries = [(name, tuple(colour)) for name, colour in zip(classes, palette)] if classes else []
    if classes:
        entries.append(("ignore (255)", tuple(int(c) for c in colorize([[255]], palette)[0, 0])))
    legend, x, y = [], 4, 4  # (x, y, name, colour) in the legend strip, wrapped to the width
    for name, colour in entries:
        w = 16 + int(font.getlength(name)) + 10
        if x + w > len(panels) * W and x > 4:
            x, y = 4, y + 14
        legend.append((x, y, name, colour))
        x += w
    picture = Image.new("RGB", (len(panels) * W, 16 + H + y + 18), "white")
    draw = ImageDraw.Draw(picture)
    for k, (panel, title) in enumerate(zip(panels, titles)):
        picture.paste(Image.fromarray(panel), (k * W, 16))
        draw.text((k * W + 3, 2), title, fill="black", font=font)
    for x, y, name, colour in legend:
        draw.rectangle([x, 16 + H + y, x + 10, 16 + H + y + 10], fill=colour, outline="black")
        draw.text((x + 14, 16 + H + y), name, fill="black", font=font)
    return picture


@torch.no_grad()
def save_vis(model, dataset, classes, palette, out_dir, n, device):
    """n PNGs of image | ground truth | prediction (decoded from the bitstream) with titles
    and a colour legend; the image's bpp (real bytes) in the title and the file name."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(min(n, len(dataset))):
        x, y = dataset[i]
        if model.decoder == "none":
            logits, tag, title = model(x[None].to(device))["logits"], "nocompression", "prediction (no compression)"
        else:
            strings = model.compress(x[None].to(device))
            bpp = 8 * len(strings[0]) / y.numel()
            logits, tag, title = model.decompress(strings), f"{bpp:.4f}bpp", f"prediction from {bpp:.3f} bpp"
        pred = logits.argmax(1)[0].cpu().numpy()
        panels = [denormalize(x), colorize(y.numpy().clip(0, 255), palette), colorize(pred, palette)]
        paths.append(os.path.join(out_dir, f"{i:03d}_{tag}.png"))
        label_picture(panels, ["image", "ground truth", title], classes, palette).save(paths[-1])
    return paths
