"""
Image quality, for the clouds that rebuild the image (the learned codec, the attacker of
extras/privacy.py): the training distortion 255^2 * MSE, and PSNR and SSIM of the image as a
screen shows it.
"""
import torch

from data import MEAN, STD


def image_mse(x_hat, x):
    """Per-image mean squared error (B,) of two normalized batches, in [0, 1] image units."""
    std = torch.tensor(STD, device=x.device).reshape(1, 3, 1, 1)
    return ((x_hat - x) * std).pow(2).flatten(1).mean(1)


def to_unit(x):
    """A normalized batch (B, 3, H, W) -> RGB in [0, 1], clamped."""
    mean, std = (torch.tensor(v, device=x.device).reshape(1, 3, 1, 1) for v in (MEAN, STD))
    return (x * std + mean).clamp(0, 1)


def as_shown(x):
    """A normalized batch -> the image as a screen shows it: RGB in [0, 1], rounded to 8 bits."""
    return torch.round(255 * to_unit(x)) / 255


def psnr(x_hat, x):
    """PSNR in dB (B,) of [0, 1] images: 10 log10(1 / MSE)."""
    return -10 * torch.log10((x_hat - x).pow(2).flatten(1).mean(1).clamp(min=1e-10))


def ssim(x_hat, x, window=11, sigma=1.5):
    """SSIM (B,) of [0, 1] images [Wang et al. 2004]: per channel, local means, variances and
    covariance under an 11x11 Gaussian window (sigma 1.5, valid positions only), C1 = 0.01^2,
    C2 = 0.03^2, the map averaged over positions and channels."""
    t = torch.arange(window, dtype=x.dtype, device=x.device) - (window - 1) / 2
    g = torch.exp(-t**2 / (2 * sigma**2))
    g = (g[:, None] * g[None, :] / g.sum() ** 2).expand(x.shape[1], 1, window, window)

    def blur(v):
        return torch.nn.functional.conv2d(v, g, groups=x.shape[1])

    mu_x, mu_y = blur(x_hat), blur(x)
    var_x, var_y = blur(x_hat * x_hat) - mu_x**2, blur(x * x) - mu_y**2
    cov = blur(x_hat * x) - mu_x * mu_y
    C1, C2 = 0.01**2, 0.03**2
    s = (2 * mu_x * mu_y + C1) * (2 * cov + C2) / ((mu_x**2 + mu_y**2 + C1) * (var_x + var_y + C2))
    return s.flatten(1).mean(1)


def image_scores(x_hat, x):
    """The summed PSNR and SSIM (2,) of a batch of normalized images as a screen shows them."""
    x_hat, x = as_shown(x_hat), as_shown(x)
    return torch.tensor([psnr(x_hat, x).sum().item(), ssim(x_hat, x).sum().item()], dtype=torch.float64)
