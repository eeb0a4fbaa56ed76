"""
Datasets: (image, label) pairs as (3, H, W) float tensors normalized with ImageNet's mean/std,
and (H, W) int64 labels with 255 = ignore.

    synthetic   built-in street scenes, rendered on the fly, no files (the default)

    ds = get_dataset("synthetic", "train")
    x, y = ds[0]
"""
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as torchvision's ResNets


def to_tensor(image, label):
    """uint8 (H, W, 3) image and (H, W) label -> normalized float tensor and int64 tensor."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return x, torch.from_numpy(np.array(label, dtype=np.int64))


def denormalize(x):
    """(3, H, W) normalized tensor -> (H, W, 3) uint8 array, for pictures."""
    x = x.cpu() * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def colorize(label, palette):
    """(H, W) label -> (H, W, 3) uint8 picture; 255 (ignore) is black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette
    return lut[np.asarray(label, dtype=np.uint8)]


# -----------------------------------------------------------------------------
# synthetic street scenes

# a handful of Cityscapes classes, with Cityscapes' names and colours
SYNTHETIC_CLASSES = ["road", "sidewalk", "building", "vegetation", "sky", "pole", "person", "car"]
SYNTHETIC_PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (107, 142, 35),
                     (70, 130, 180), (153, 153, 153), (220, 20, 60), (0, 0, 142)]
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, POLE, PERSON, CAR = range(8)


def render_street(rng, H=128, W=256):
    """One street scene drawn back to front: sky, facades with windows, trees, pavement,
    road with lane marks, poles, then cars and people sorted by depth. The colour ranges of
    the classes overlap (grey road, grey facades, grey poles, overcast sky, grey cars), so
    that segmenting needs shape and context. Returns uint8 image (H, W, 3), label (H, W)."""
    u = rng.uniform
    label = Image.new("L", (W, H), SKY)
    image = Image.new("RGB", (W, H))
    L, C = ImageDraw.Draw(label), ImageDraw.Draw(image)

    def grey(lo, hi, tint=12):  # a greyish colour with a small random tint
        g = u(lo, hi)
        return tuple(int(np.clip(g + u(-tint, tint), 0, 255)) for _ in range(3))

    def draw(kind, xy, cls, colour):
        getattr(L, kind)(xy, fill=cls)
        getattr(C, kind)(xy, fill=colour)

    y0 = int(H * u(0.35, 0.55))  # horizon
    vx = W * u(0.3, 0.7)  # vanishing point of the road
    # sky: clear (blue gradient) or overcast (grey, like the facades)
    top, bottom = ((u(60, 110), u(110, 160), u(170, 230)), (u(150, 200), u(180, 220), u(200, 240))) \
        if u() < 0.6 else (grey(140, 200), grey(170, 220))
    for y in range(y0 + 1):
        t = y / max(y0, 1)
        C.line([(0, y), (W, y)], fill=tuple(int(a + t * (b - a)) for a, b in zip(top, bottom)))

    # facades along the horizon, taller away from the vanishing point, some gaps of sky
    x = -u(0, 0.1) * W
    while x < W:
        w = W * u(0.08, 0.25)
        if u() < 0.85:
            h = H * u(0.08, 0.25) * (1 + 2.5 * abs(x + w / 2 - vx) / W)
            colour = grey(60, 200) if u() < 0.6 else tuple(int(u(90, 200) * k) for k in (1, 0.85, 0.7))
            draw("rectangle", [x, y0 - h, x + w, y0 + 2], BUILDING, colour)
            shade = u(0.3, 0.7) if u() < 0.7 else u(1.2, 1.5)  # dark or lit windows
            win = tuple(int(min(255, c * shade)) for c in colour)
            ws, wy = max(3, w * u(0.1, 0.2)), max(3, h * u(0.06, 0.12))
            for wx0 in np.arange(x + ws / 2, x + w - ws, 2 * ws):
                for wy0 in np.arange(y0 - h + wy, y0 - wy, 2 * wy):
                    C.rectangle([wx0, wy0, wx0 + ws, wy0 + wy], fill=win)
        x += w

    # ground: pavement everywhere below the horizon, optional grass verges, then the road
    draw("rectangle", [0, y0, W, H], SIDEWALK,
         grey(110, 180) if u() < 0.6 else tuple(int(u(130, 190) * k) for k in (1, 0.8, 0.8)))
    half = W * u(0.25, 0.5)  # half road width at the bottom
    if u() < 0.5:
        green = (int(u(40, 100)), int(u(90, 150)), int(u(20, 70)))
        side = half * u(1.5, 2.2)
        draw("polygon", [(vx - 2, y0), (vx - side, H), (0, H), (0, y0 + 1)], VEGETATION, green)
        draw("polygon", [(vx + 2, y0), (vx + side, H), (W, H), (W, y0 + 1)], VEGETATION, green)
        draw("polygon", [(vx - 1, y0), (vx - half * 1.3, H), (vx + half * 1.3, H), (vx + 1, y0)],
             SIDEWALK, grey(110, 180))
    draw("polygon", [(vx - 1, y0), (vx - half, H), (vx + half, H), (vx + 1, y0)], ROAD, grey(50, 120))
    for t in np.arange(0.05, 1, 0.12):  # dashed centre line, label road
        ya, yb = y0 + t * (H - y0), y0 + (t + 0.05) * (H - y0)
        C.line([(vx, ya), (vx, yb)], fill=grey(190, 240), width=max(1, int(3 * t)))

    # trees: a trunk and a crown (both vegetation), standing on the pavement
    for _ in range(rng.integers(0, 5)):
        t = u(0.05, 0.6)
        yb = y0 + t * (H - y0)
        xb = vx + rng.choice([-1, 1]) * half * t * u(1.15, 2.5)
        r = H * u(0.06, 0.15) * (0.5 + t)
        green = (int(u(30, 110)), int(u(70, 160)), int(u(10, 70)))
        draw("rectangle", [xb - r * 0.1, yb - 2.2 * r, xb + r * 0.1, yb], VEGETATION, (int(u(60, 100)),) * 3)
        draw("ellipse", [xb - r, yb - 3.6 * r, xb + r, yb - 1.6 * r], VEGETATION, green)

    # depth-sorted objects: poles and people on the pavement, cars on the road
    objects = [("pole", u(0.05, 1)) for _ in range(rng.integers(1, 5))]
    objects += [("person", u(0.1, 1)) for _ in range(rng.integers(0, 5))]
    objects += [("car", u(0.1, 1)) for _ in range(rng.integers(0, 4))]
    for kind, t in sorted(objects, key=lambda o: o[1]):
        yb = y0 + t * (H - y0)  # bottom of the object, t = 0 at the horizon, 1 at the bottom
        if kind == "pole":
            xb = vx + rng.choice([-1, 1]) * half * t * u(1.1, 1.6)
            w, h = max(1.0, 3 * t), H * u(0.3, 0.6) * (0.4 + t)
            draw("rectangle", [xb, yb - h, xb + w, yb], POLE, grey(90, 180))
            if u() < 0.4:  # a sign or lamp head, still pole
                draw("rectangle", [xb - 2 * w, yb - h, xb + 3 * w, yb - h + 3 * w], POLE, grey(60, 200))
        elif kind == "person":
            xb = vx + rng.choice([-1, 1]) * half * t * u(1.05, 1.8)
            h = H * u(0.25, 0.45) * t
            w = h * u(0.25, 0.35)
            cloth = tuple(int(c) for c in rng.integers(0, 256, 3))
            skin = tuple(int(u(110, 230) * k) for k in (1, 0.8, 0.65))
            draw("rectangle", [xb - w / 2, yb - 0.8 * h, xb + w / 2, yb - 0.4 * h], PERSON, cloth)
            draw("rectangle", [xb - w / 2, yb - 0.4 * h, xb - w / 12, yb], PERSON, grey(20, 120))
            draw("rectangle", [xb + w / 12, yb - 0.4 * h, xb + w / 2, yb], PERSON, grey(20, 120))
            draw("ellipse", [xb - w / 3, yb - h, xb + w / 3, yb - 0.78 * h], PERSON, skin)
        else:
            w = W * u(0.2, 0.35) * t
            xb = vx + u(-0.8, 0.8) * (half * t - w / 2)
            h = w * u(0.45, 0.6)
            paint = grey(20, 230) if u() < 0.5 else tuple(int(c) for c in rng.integers(0, 256, 3))
            dark = grey(10, 60)
            draw("rectangle", [xb - w / 2, yb - 0.55 * h, xb + w / 2, yb - 0.12 * h], CAR, paint)
            draw("polygon", [(xb - 0.4 * w, yb - 0.55 * h), (xb - 0.25 * w, yb - h),
                             (xb + 0.25 * w, yb - h), (xb + 0.4 * w, yb - 0.55 * h)], CAR, paint)
            C.polygon([(xb - 0.33 * w, yb - 0.58 * h), (xb - 0.22 * w, yb - 0.92 * h),
                       (xb + 0.22 * w, yb - 0.92 * h), (xb + 0.33 * w, yb - 0.58 * h)], fill=dark)
            for wx in (xb - 0.3 * w, xb + 0.3 * w):  # wheels
                draw("ellipse", [wx - 0.12 * w, yb - 0.25 * h, wx + 0.12 * w, yb], CAR, dark)

    # texture noise, illumination and blur: colour alone must not give the class away
    image = image.filter(ImageFilter.GaussianBlur(u(0, 1.2)))
    img = np.asarray(image, np.float32)
    coarse = rng.normal(0, u(5, 20), (4, 8, 3)).astype(np.float32)
    img += np.asarray(Image.fromarray(coarse[..., 0]).resize((W, H), Image.BILINEAR))[..., None]
    img += rng.normal(0, u(3, 12), img.shape).astype(np.float32)
    gain = u(0.6, 1.3) * (1 + u(-0.3, 0.3) * np.linspace(-1, 1, W, dtype=np.float32))
    img = np.clip(img * gain[None, :, None], 0, 255).astype(np.uint8)
    return img, np.asarray(label, np.uint8)


class SyntheticStreets(torch.utils.data.Dataset):
    """Built-in street scenes, rendered on the fly; image i of a split is the same for a
    given seed on every machine. Fixed splits: train and val never share a scene."""

    classes, palette = SYNTHETIC_CLASSES, SYNTHETIC_PALETTE

    def __init__(self, split="train", n=None, size=(128, 256), seed=0):
        if split not in ("train", "val"):
            raise ValueError(f"synthetic has splits train and val, not {split!r}")
        self.split, self.size, self.seed = split, size, seed
        self.n = n if n is not None else {"train": 3000, "val": 200}[split]

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key  # (index, epoch) from train.py
        rng = np.random.default_rng([self.seed, ("train", "val").index(self.split), index])
        return to_tensor(*render_street(rng, *self.size))


def get_dataset(name, split, root=None, crop=None, seed=0):
    """The dataset `name` ("synthetic") for `split` ("train" or "val")."""
    if name == "synthetic":
        return SyntheticStreets(split, seed=seed)
    raise ValueError(f"unknown dataset {name!r}")
