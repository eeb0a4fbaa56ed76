"""
Fig. 6's pictures: image | ground truth | predictions decoded from the bitstreams, with titles
and a colour legend (evaluate.py --save-vis, --vis-with); label_picture also lays out the
attack's pictures (extras/privacy.py).
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
    picture = Image.new("RGB", (len(panels) * W, 16 + H + (y + 18 if legend else 0)), "white")
    draw = ImageDraw.Draw(picture)
    for k, (panel, title) in enumerate(zip(panels, titles)):
        picture.paste(Image.fromarray(panel), (k * W, 16))
        draw.text((k * W + 3, 2), title, fill="black", font=font)
    for x, y, name, colour in legend:
        draw.rectangle([x, 16 + H + y, x + 10, 16 + H + y + 10], fill=colour, outline="black")
        draw.text((x + 14, 16 + H + y), name, fill="black", font=font)
    return picture


NAMES = {"none": "No Compression", "jd": "JD", "ahuja": "Ahuja et al."}


@torch.no_grad()
def predict(model, x, device):
    """(mask, bpp) of one image: decoded from its bitstream (bpp of its bytes), or No
    Compression's (bpp None)."""
    if model.decoder == "none":
        return model(x[None].to(device))["logits"].argmax(1)[0].cpu().numpy(), None
    strings = model.compress(x[None].to(device))
    return model.decompress(strings).argmax(1)[0].cpu().numpy(), 8 * len(strings[0]) / x[0].numel()


def save_vis(models, dataset, classes, palette, out, n, device):
    """Pictures of the first n images: image | ground truth | each model's prediction (decoded
    from the bitstream, its bpp in the title). `out` a directory: one PNG per image, the bpp in
    the file name; `out` a .png: one picture, an image a row, as Fig. 6. Returns the paths."""
    one, count = out.endswith(".png"), min(n, len(dataset))  # one picture: a row an image, one legend below
    rows, paths = [], []
    for i in range(count):
        x, y = dataset[i]
        panels, titles = [denormalize(x), colorize(y.numpy().clip(0, 255), palette)], ["image", "ground truth"]
        for model in models:
            pred, bpp = predict(model, x, device)
            panels.append(colorize(pred, palette))
            if len(models) == 1:
                titles.append("prediction (no compression)" if bpp is None else f"prediction from {bpp:.3f} bpp")
            else:
                titles.append(NAMES.get(model.decoder, model.decoder) + ("" if bpp is None else f", {bpp:.3f} bpp"))
        row = label_picture(panels, titles, classes if not one or i == count - 1 else None, palette)
        if one:
            rows.append(row)
        else:
            os.makedirs(out, exist_ok=True)
            paths.append(os.path.join(out, f"{i:03d}_{'nocompression' if bpp is None else f'{bpp:.4f}bpp'}.png"))
            row.save(paths[-1])
    if one:  # the rows stacked
        picture = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
        for k, row in enumerate(rows):
            picture.paste(row, (0, sum(r.height for r in rows[:k])))
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        picture.save(out)
        paths.append(out)
    return paths
