"""--finetune N: transfer learning's second stage (fastai's fine_tune, the Keras transfer-learning guide). Once a head
is fit on the frozen backbone's features, the backbone's last stages (model/backbones.py trunk_stages) are trained
with it on augmented views (a random resized crop, colour jitter, flip, rotation: model/transforms.py jittered) at a
small learning rate, stopping early on the validation split's loss: first the top stage alone, then the top two and
so on up to N, while one stage more lowers the best validation loss (early stopping in depth as in epochs).

The frozen stages below are most of a pass, so their output for each tile of each view is computed once
(FINETUNE_VIEWS augmented views per training image, the plain view of each validation image) and kept as float16,
and every epoch runs only the N stages over it (those not trained as they are). BatchNorm keeps its ImageNet
statistics (eval mode): batches of a few photos would make poor ones.

finetune() returns what the checkpoint keeps as "tuned": the trained stages' state, which FeatureExtractor puts in
place and keys its features by (model/features.py). The rest of training (the head refit on the tuned features, the
threshold, the signature, the report), predict, evaluate, serve and export then use the tuned backbone as they use a
frozen one.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import ModelConfig, TrainConfig
from ..data.datasets import Sample
from ..data.images import file_digest, read_image
from ..errors import StopsignError
from ..model.backbones import trunk_stages
from ..model.devices import decode_workers
from ..model.features import (FORWARD_CHUNK, FeatureExtractor, ForwardInWorkers, allocate, forward_chunks,
                              runs_in_workers)
from ..model.pooling import AllPoolings
from ..model.transforms import decode_size, jittered, tile_count, tile_views
from .fitting import make_criterion

log = logging.getLogger(__name__)

FINETUNE_VIEWS = 4  # augmented views kept per training image; each epoch trains on one of them, drawn anew
MAX_EPOCHS = 10
PATIENCE = 2  # epochs without a lower validation loss before stopping
STAGE_LR, HEAD_LR = 1e-4, 1e-3  # Adam; the pretrained stages move ten times slower than the head (fastai's habit)


def finetune(extractor: FeatureExtractor, head: nn.Linear, train: list[Sample], val: list[Sample],
             model: ModelConfig, recipe: TrainConfig, *, progress: bool = False) -> dict:
    """Train at most the backbone's last recipe.finetune stages with `head` (a copy; the fitted head is the start),
    the number chosen by early stopping on the validation split: the top stage alone, then one stage more, on top of
    the same cached outputs of the frozen stages below, while the best validation loss falls. Returns
    {"stages", "state", "sha256", "history", "best_epoch", "tried", "passes", "seconds"}: the number kept, the kept
    epoch's state of those stages by their names in the backbone's model, its digest, its epochs' losses, each number
    tried with its best validation loss, and the cost."""
    start, most = time.perf_counter(), recipe.finetune
    backbone = extractor.backbone.model
    stages = trunk_stages(backbone.trunk)
    if most > len(stages):
        raise StopsignError(f"--finetune {most}: {extractor.name}'s trunk has {len(stages)} stages. Fix: --finetune "
                            f"1 to {len(stages)} (1 or 2 is usual: the fewer, the faster and the less it can overfit)")
    lower, original = nn.Sequential(*stages[:-most]).to(extractor.device), nn.Sequential(*stages[-most:])
    views = FINETUNE_VIEWS if recipe.augment else 0  # --no-augment: the plain view alone
    train_inputs, train_labels = lower_outputs(lower, extractor, train, model, recipe, views, progress)
    val_inputs, val_labels = lower_outputs(lower, extractor, val, model, recipe, 0, progress)
    data = (train_inputs, train_labels, val_inputs, val_labels)
    tried, chosen = [], None
    for count in range(1, most + 1):
        history, best, kept = train_stages(original, count, head, data, train, model, recipe, extractor.device,
                                           progress)
        tried.append({"stages": count, "val_loss": history[best - 1]["val_loss"], "epochs": len(history)})
        if chosen is not None and tried[-1]["val_loss"] >= tried[chosen[0] - 1]["val_loss"]:
            break  # one stage more did not help: the depth's early stop
        chosen = (count, history, best, kept)
    count, history, best, kept = chosen
    names = {id(tensor): name for name, tensor in backbone.state_dict(keep_vars=True).items()}
    state = {names[id(tensor)]: kept[key].contiguous() for key, tensor in original.state_dict(keep_vars=True).items()
             if key in kept}
    seconds = time.perf_counter() - start
    passes = (len(train_labels) * train_inputs.shape[1] + len(val_labels)) * tile_count(model.tiles)
    log.info("fine-tuned the backbone's last %d stage(s) of at most %d (best validation loss for %s): %d epoch(s), "
             "kept epoch %d (validation loss %.4f, accuracy %.3f); %d passes of the frozen stages, %.1f s", count,
             most, ", ".join(f"{t['stages']}: {t['val_loss']:.4f}" for t in tried), len(history), best,
             history[best - 1]["val_loss"], history[best - 1]["val_acc"], passes, seconds)
    return {"stages": count, "state": state, "sha256": digest(state), "history": history, "best_epoch": best,
            "tried": tried, "passes": passes, "seconds": round(seconds, 1)}


def train_stages(original: nn.Sequential, count: int, head: nn.Linear, data: tuple, train: list[Sample],
                 model: ModelConfig, recipe: TrainConfig, device, progress: bool) -> tuple[list[dict], int, dict]:
    """The last `count` of `original`'s stages trained with a copy of `head`, those above the frozen cache and below
    them run as they are, until the validation loss has not fallen for PATIENCE epochs: the epochs' losses, the best
    epoch, and the trained stages' state at it (keys of `original`'s state dict)."""
    train_inputs, train_labels, val_inputs, val_labels = data
    upper = copy.deepcopy(original).to(device)
    trained = [index >= len(upper) - count for index in range(len(upper))]
    for stage, on in zip(upper, trained):
        stage.requires_grad_(on)
    head = copy.deepcopy(head).to(device).requires_grad_(True)
    network = _Upper(upper, head, model.pooling)
    criterion = make_criterion(recipe, train, head.out_features).to(device)
    scorer = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.Adam([{"params": [p for p in upper.parameters() if p.requires_grad], "lr": STAGE_LR},
                                  {"params": head.parameters(), "lr": HEAD_LR}])
    rng = np.random.default_rng([recipe.seed, count])
    history, best, kept = [], None, None
    bar = tqdm(range(1, MAX_EPOCHS + 1), desc=f"fine-tuning {count} stage(s)", unit="epoch", disable=not progress,
               leave=False)
    for epoch in bar:
        order = rng.permutation(len(train_labels))
        drawn = rng.integers(0, train_inputs.shape[1], len(order))
        train_loss = 0.0
        for at in range(0, len(order), recipe.batch_size):
            rows = order[at:at + recipe.batch_size]
            inputs = torch.from_numpy(np.stack([train_inputs[row, view] for row, view in zip(rows, drawn[at:])]))
            loss = criterion(network(inputs.to(device)), torch.from_numpy(train_labels[rows]).to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            train_loss += loss.item() * len(rows)
        val_loss, val_acc = _score(network, val_inputs, val_labels, scorer, recipe.batch_size, device)
        history.append({"epoch": epoch, "train_loss": train_loss / len(order), "val_loss": val_loss,
                        "val_acc": val_acc})
        bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.3f}")
        if best is None or val_loss < history[best - 1]["val_loss"]:
            best = epoch
            kept = {key: value.detach().cpu().clone() for key, value in upper.state_dict().items()
                    if trained[int(key.split(".")[0])]}
        elif epoch - best >= PATIENCE:
            break
    return history, best, kept


def digest(state: dict) -> str:
    """The sha256 of a state dict's names and values: what the tuned backbone's features are keyed by."""
    hasher = hashlib.sha256()
    for name in sorted(state):
        hasher.update(name.encode())
        hasher.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


class _Upper(nn.Module):
    """The trained stages, the pooling and the head: the frozen stages' outputs of each image's tiles (N, T, C, h, w)
    to logits, as model/features.py and the head see a full pass."""

    def __init__(self, stages: nn.Module, head: nn.Linear, pooling: str):
        super().__init__()
        self.stages, self.head, self.pooling = stages, head, pooling

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        maps = self.stages(inputs.flatten(0, 1).float().contiguous(memory_format=torch.channels_last))
        maps = maps[:, :, None, None] if maps.dim() == 2 else maps
        return self.head(AllPoolings.image_features(maps, inputs.shape[0], self.pooling))


def _score(network: nn.Module, inputs: np.ndarray, labels: np.ndarray, scorer, batch_size: int, device
           ) -> tuple[float, float]:
    """(loss, accuracy) on the validation split's plain views."""
    logits = []
    with torch.no_grad():
        for at in range(0, len(labels), batch_size):
            logits.append(network(torch.from_numpy(inputs[at:at + batch_size, 0]).to(device)).cpu())
    logits = torch.cat(logits)
    truth = torch.from_numpy(labels)
    return float(scorer(logits, truth)), float((logits.argmax(1) == truth).float().mean())


def lower_outputs(lower: nn.Module, extractor: FeatureExtractor, samples: list[Sample], model: ModelConfig,
                  recipe: TrainConfig, views: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """The frozen stages' output (N, V, T, C, h, w) float16 for each view of each tile of the samples that can be
    read, and their labels: V = `views` augmented views (jittered, drawn from the seed and the image's content), or
    the plain view alone with views=0. Memory-mapped beside the feature store when it would not fit in memory."""
    dataset = _Views(samples, extractor.preprocessing, model, recipe, views)
    size = extractor.preprocessing["size"]
    with torch.no_grad():
        shape = lower(torch.zeros(1, 3, size, size, device=extractor.device)).shape[1:]
    per_image = max(1, views) * tile_count(model.tiles)
    out = allocate((len(samples), max(1, views), tile_count(model.tiles), *shape), extractor.store, np.float16)
    read = np.zeros(len(samples), dtype=bool)
    per_batch = max(1, FORWARD_CHUNK // per_image)
    workers = decode_workers(extractor.device, extractor.num_workers) if len(samples) > per_batch else 0
    in_workers = runs_in_workers(extractor.device, workers)  # as the feature pass runs the backbone
    loader = DataLoader(dataset, batch_size=per_batch, num_workers=workers,
                        collate_fn=ForwardInWorkers(lower, None) if in_workers else list)
    with tqdm(total=len(samples), desc="frozen stages", unit="img", disable=not progress, leave=False) as bar:
        for batch in loader:
            batch, result = batch if in_workers else (batch, None)
            good = [index for index, _, error in batch if error is None]
            if good and result is None:
                result = forward_chunks(lower, torch.cat([tensor for _, tensor, error in batch if error is None]),
                                        None, extractor.device)
            for at, index in enumerate(good):
                out[index] = result[at * per_image:(at + 1) * per_image].half().numpy().reshape(out.shape[1:])
                read[index] = True
            bar.update(len(batch))
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return out[read] if not read.all() else out, labels[read]


class _Views(Dataset):
    """Item i: (i, every view of sample i's every tile as one (V × T, 3, S, S) tensor, None), or (i, None, the reason
    it cannot be read), as model/features.py's ViewsDataset gives them (the feature pass before this one logged it)."""

    def __init__(self, samples: list[Sample], preprocessing: dict, model: ModelConfig, recipe: TrainConfig,
                 views: int):
        self.samples, self.preprocessing, self.model, self.recipe, self.views = (samples, preprocessing, model,
                                                                                 recipe, views)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, model = self.samples[index].path, self.model
        side = decode_size(self.preprocessing, model.tiles, model.tile_pixels)
        try:
            image = read_image(path, draft=(side, side))
            seed = int(file_digest(path)[:15], 16)
        except (StopsignError, OSError) as error:
            return index, None, str(error)
        arrays = []
        for view in range(1, self.views + 1):
            rng = np.random.default_rng([self.recipe.seed, view, seed, 2])
            crop, flip, angle = jittered(image, rng, self.recipe.rotation)
            arrays += tile_views(crop, self.preprocessing, model.tiles, flip, angle, model.tile_pixels)
        if not self.views:
            arrays = tile_views(image, self.preprocessing, model.tiles, pixels=model.tile_pixels)
        return index, torch.from_numpy(np.stack(arrays)), None
