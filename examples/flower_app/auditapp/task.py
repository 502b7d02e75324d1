"""auditapp: the model, the data and the training loop (Flower's template shape; fedprobe appears nowhere here).

The data are made here, offline: 10 classes of 3x32x32 images, each class a smooth random pattern plus pixel
noise, split IID into partitions. Batches are dicts {"img", "label"}, as flwr-datasets' CIFAR-10 gives them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the transform Normalize((0.5,)*3, (0.5,)*3) of the template


class Net(nn.Module):
    """A small CNN: two conv blocks and a two-layer classifier (inputs [B, 3, 32, 32] -> logits [B, 10])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 5)  # [B, 8, 28, 28] -> pool [B, 8, 14, 14]
        self.conv2 = nn.Conv2d(8, 16, 5)  # [B, 16, 10, 10] -> pool [B, 16, 5, 5]
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(16 * 5 * 5, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)  # [B, 400]
        return self.fc2(F.relu(self.fc1(x)))


class SyntheticImages(Dataset):
    """``n`` examples of ``split`` ("train"/"test"), deterministic in (seed, split, partition)."""

    def __init__(self, n: int, split: str, partition: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        coarse = torch.rand(NUM_CLASSES, 3, 4, 4, generator=gen)
        self.patterns = F.interpolate(coarse, size=IMAGE_SHAPE[1:], mode="bilinear", align_corners=False)
        gen = torch.Generator().manual_seed(seed * 1000 + (0 if split == "train" else 1) * 100 + partition + 1)
        self.labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        noise = 0.25 * torch.randn(n, *IMAGE_SHAPE, generator=gen)
        images = (self.patterns[self.labels] + noise).clamp(0, 1)
        self.images = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"img": self.images[i], "label": self.labels[i]}


def load_data(partition_id: int, num_partitions: int, batch_size: int, examples: int) -> tuple[DataLoader, DataLoader]:
    """This partition's train loader (shuffled, last batch kept) and the shared test loader."""
    train = SyntheticImages(examples, "train", partition_id)
    test = SyntheticImages(200, "test", 0)
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(test, batch_size=64)


def train(net: nn.Module, trainloader: DataLoader, epochs: int, lr: float, device: str,
          optimizer: torch.optim.Optimizer | None = None) -> float:
    """The template's loop: SGD with momentum 0.9 over ``epochs`` passes; returns the mean training loss."""
    net.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = optimizer or torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running, steps = 0.0, 0
    for _ in range(epochs):
        for batch in trainloader:
            images, labels = batch["img"].to(device), batch["label"].to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running += loss.item()
            steps += 1
    return running / max(steps, 1)


@torch.no_grad()
def test(net: nn.Module, testloader: DataLoader, device: str) -> tuple[float, float]:
    """(mean loss, accuracy) on ``testloader``."""
    net.to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss, correct, n = 0.0, 0, 0
    for batch in testloader:
        images, labels = batch["img"].to(device), batch["label"].to(device)
        out = net(images)
        loss += float(criterion(out, labels))
        correct += int((out.argmax(1) == labels).sum())
        n += len(labels)
    return loss / n, correct / n
