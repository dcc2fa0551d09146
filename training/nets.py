"""The demo networks and their serving forms (probs, heatmap, ood_score in one ONNX graph)."""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class CamNet(nn.Module):
    """Conv stack 28→14→7, global average pool, linear head (so CAMs are exact)."""

    def __init__(
        self,
        widths: tuple[int, int, int, int],
        dropout: float = 0.0,
        in_channels: int = 1,
        classes: int = 2,
    ) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.features = nn.Sequential(
            _block(in_channels, w1, False),
            _block(w1, w2, True),
            _block(w2, w3, True),
            _block(w3, w4, False),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(w4, classes)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, 7×7 feature map, 14×14 middle feature map)."""
        mid = self.features[1](self.features[0](x))  # (B, w2, 14, 14)
        fmap = self.features[3](self.features[2](mid))  # (B, w4, 7, 7)
        logits = self.head(self.dropout(fmap.mean(dim=(2, 3))))
        return logits, fmap, mid

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, fmap, _ = self.forward_all(x)
        return logits, fmap


ARCHITECTURES: dict[str, dict[str, object]] = {
    "small": {"widths": (16, 32, 64, 64), "dropout": 0.1},
    "wide": {"widths": (24, 48, 96, 96), "dropout": 0.2},
}


# Levels (in normalised units, (x - mean) / std with mean = std = 0.5: -1 .. 1) at which the
# input's cumulative intensity distribution is read.
CDF_LEVELS = tuple(-1.0 + 2.0 * (k + 0.5) / 16 for k in range(16))


def ood_features(image: torch.Tensor, fmap: torch.Tensor, mid: torch.Tensor) -> list[torch.Tensor]:
    """The feature groups the out-of-distribution detector measures, one (B, D) each:
    penultimate pooled features, middle-layer pooled features, per-channel spatial spread of
    the last feature map (what rotation and inversion change), the input's 7×7 layout, its
    intensity distribution (share of pixels above 16 levels, per channel) and its 7×7 layout
    of local contrast (mean absolute neighbour difference: speckle, edges, flat fields)."""
    gap = fmap.mean(dim=(2, 3))
    spread = (fmap * fmap).mean(dim=(2, 3)) - gap * gap
    layout = nn.functional.avg_pool2d(image, 4).flatten(1)
    cdf = torch.cat([(image > level).float().mean(dim=(2, 3)) for level in CDF_LEVELS], dim=1)
    dx = (image[:, :, :, 1:] - image[:, :, :, :-1]).abs()
    dy = (image[:, :, 1:, :] - image[:, :, :-1, :]).abs()
    contrast = nn.functional.pad(dx, (0, 1, 0, 0)) + nn.functional.pad(dy, (0, 0, 0, 1))
    texture = nn.functional.avg_pool2d(contrast.mean(dim=1, keepdim=True), 4).flatten(1)
    return [gap, mid.mean(dim=(2, 3)), spread.clamp_min(0.0).sqrt(), layout, cdf, texture]


OOD_GROUPS = (
    "penultimate",
    "middle",
    "spatial_spread",
    "input_layout",
    "intensity_cdf",
    "texture_layout",
)


class OodHead(nn.Module):
    """Class-conditional Mahalanobis distance with a shared covariance per feature group,
    each divided by its in-distribution reference quantile, and (optionally) a linear
    outlier-exposure term on all groups together, exp(w·f + b − q), equal to 1 at its own
    reference quantile q. The score is the largest term: > 1 means beyond the reference."""

    def __init__(
        self,
        chol: list[torch.Tensor],
        means: list[torch.Tensor],
        scale: list[float],
        linear: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        for g, (c, m, s) in enumerate(zip(chol, means, scale, strict=True)):
            # z = f @ L with L Lᵀ = Σ⁻¹, so |z - m L|² is the Mahalanobis distance to m.
            self.register_buffer(f"chol{g}", c.float())
            self.register_buffer(f"mchol{g}", (m.double() @ c.double()).float())
            self.register_buffer(f"inv_scale{g}", torch.tensor(1.0 / s, dtype=torch.float32))
        self.groups = len(chol)
        self.linear = linear is not None
        if linear is not None:
            self.register_buffer("lin_w", linear["w"].float())
            self.register_buffer("lin_b", (linear["b"] - linear["q"]).float().reshape(()))

    def distances(self, feats: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for g, f in enumerate(feats):
            z = f @ getattr(self, f"chol{g}")
            d = ((z[:, None, :] - getattr(self, f"mchol{g}")[None]) ** 2).sum(-1)
            out.append(d.min(dim=1).values * getattr(self, f"inv_scale{g}"))
        if self.linear:
            logit = torch.cat(feats, dim=1) @ self.lin_w + self.lin_b
            out.append(torch.exp(logit.clamp(-30.0, 30.0)))
        return torch.stack(out, dim=1)  # (B, groups [+ 1])

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.distances(feats).max(dim=1, keepdim=True).values  # (B, 1)


class ServingExport(nn.Module):
    """image → probs (temperature-scaled softmax), [heatmap], ood_score — the config order."""

    def __init__(
        self, net: CamNet, temperature: float, ood: OodHead, attention: bool = False
    ) -> None:
        super().__init__()
        self.net = net
        self.ood = ood
        self.attention = attention
        self.register_buffer("inv_t", torch.tensor(1.0 / temperature))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, fmap, mid = self.net.forward_all(image)
        probs = torch.softmax(logits * self.inv_t, dim=1)
        ood = self.ood(ood_features(image, fmap, mid))
        if not self.attention:
            return probs, ood
        # The 'pneumonia' class activation map (pneumonia vs normal), in [0, 1] per image.
        weights = self.net.head.weight[1] - self.net.head.weight[0]
        cam = torch.relu(torch.einsum("c,bchw->bhw", weights, fmap))
        peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-6)
        return probs, cam / peak[:, None, None], ood
