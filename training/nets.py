"""The demo networks. Each returns logits and a 7×7 feature map for class activation maps."""

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

    def __init__(self, widths: tuple[int, int, int, int], dropout: float = 0.0) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.features = nn.Sequential(
            _block(1, w1, False),
            _block(w1, w2, True),
            _block(w2, w3, True),
            _block(w3, w4, False),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(w4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.features(x)  # (B, C, 7, 7)
        logits = self.head(self.dropout(fmap.mean(dim=(2, 3))))
        return logits, fmap


ARCHITECTURES: dict[str, dict[str, object]] = {
    "small": {"widths": (16, 32, 64, 64), "dropout": 0.1},
    "wide": {"widths": (24, 48, 96, 96), "dropout": 0.2},
}


class TriageExport(nn.Module):
    """image → probs: softmax of temperature-scaled logits."""

    def __init__(self, net: CamNet, temperature: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("inv_t", torch.tensor(1.0 / temperature))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits, _ = self.net(image)
        return torch.softmax(logits * self.inv_t, dim=1)


class AnalysisExport(TriageExport):
    """image → (probs, heatmap): the 'pneumonia' class activation map, in [0, 1] per image."""

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits, fmap = self.net(image)
        probs = torch.softmax(logits * self.inv_t, dim=1)
        weights = self.net.head.weight[1] - self.net.head.weight[0]  # pneumonia vs normal
        cam = torch.relu(torch.einsum("c,bchw->bhw", weights, fmap))
        peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-6)
        return probs, cam / peak[:, None, None]
