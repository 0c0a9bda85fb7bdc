"""Image views and the one batched pass of a frozen backbone over them, with an on-disk feature store.

A frozen backbone in eval mode is a pure function of (weights, preprocessing, pixels), so the pooled
features of every view of every image are computed once and reused by every later epoch, run, fold and
trial. A stored feature is keyed by the backbone's weights and preprocessing (the folder) and by the image
file's content digest and the view (the file name): a renamed image still hits, an edited one misses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import available_cores
from ..cache import FEATURES, store_dir
from ..data.images import file_digest, photo_size, read_image
from ..errors import StopsignError
from ..store import MemoryStore, ShardStore
from .devices import autocast_dtype, cache_suffix, decode_workers, forward_chunk, resolve_device
from .backbones import Backbone, get_spec, load_backbone, model_key, weights_sha256
from .pooling import REGIONS, SLOTS, STORED, combine_tiles, pooled
from .rewrites import inference_model
from .transforms import (decode_size, pixel_grid, preprocess, tile_box, tile_count, tile_views, view_params,
                         view_tag)

log = logging.getLogger(__name__)

# Above this size the assembled feature matrix lives in a memory-mapped temporary file, not in RAM.
IN_MEMORY_LIMIT = 1 << 30
# Views per backbone call: small enough that a layer's activations stay in the CPU's caches, large enough
# to share the per-call overhead (bench/bench_forward.py and bench/bench_speed.py measure it).
FORWARD_CHUNK = 8


def default_cache_dir() -> Path:
    return store_dir(FEATURES)


class ViewsDataset(Dataset):
    """Item i: every requested view of image i as one tensor, or the reason it cannot be read. A view is
    (flip, angle) or (flip, angle, tile): tile 0 is the whole image, 1..K×K a crop of the `tiles` grid.

    Decoding happens here, in DataLoader workers, so it overlaps with the backbone's forward pass.
    """

    def __init__(self, paths: list[Path], views: list[list[tuple]], preprocessing: dict, tiles: int = 1,
                 pixels: int = 0):
        self.paths, self.views, self.preprocessing, self.tiles, self.pixels = paths, views, preprocessing, tiles, pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        size = decode_size(self.preprocessing, self.tiles, self.pixels)
        try:
            image = read_image(self.paths[index], draft=(size, size))
        except StopsignError as error:
            return index, None, str(error)
        tensors = []
        for flip, angle, *tile in self.views[index]:
            crop = image.crop(tile_box(*image.size, self.tiles, tile[0], self.pixels)) if tile and tile[0] else image
            tensors.append(torch.from_numpy(preprocess(crop, self.preprocessing, flip, angle)))
        return index, torch.stack(tensors), None


def view_loader(dataset: ViewsDataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list,
                      persistent_workers=False)


# --- extraction -----------------------------------------------------------------------------------------

@dataclass
class FeatureSet:
    paths: list[Path]  # the images that could be read, in input order
    digests: list[str]
    features: np.ndarray  # (len(paths), len(views), width) float32, columns in the order asked, of the pooling
    # asked, tiles combined (FeatureExtractor.width: feature_size, or for regions feature_size × regions × tiles)
    skipped: dict[str, str] = field(default_factory=dict)  # path → reason
    computed: int = 0  # views that went through the backbone (0 on a warm cache)


class FeatureExtractor:
    """A backbone, loaded only when some view is not in the store, and its store. device: see model/devices.py
    (auto: a CUDA GPU when there is one, else the CPU, whose features are exactly those of stopsign before it)."""

    def __init__(self, backbone: str, weights: str | None = None, *, cache_dir: Path | None = None,
                 num_workers: int = 2, batch_size: int = 32, bf16: bool = False, image_size: int | None = None,
                 device: str | torch.device | None = "auto", tuned: dict | None = None):
        """tuned: the backbone's stages a --finetune run trained, {"stages", "state", "sha256"} (its checkpoint's
        "tuned"): their features are keyed apart by the state's digest."""
        spec = get_spec(backbone)
        self.name, self.weights = backbone, weights
        self.weights_sha256 = weights_sha256(backbone, weights)
        self.preprocessing, self.feature_size = dict(spec.preprocessing), spec.feature_size
        if image_size:  # another input size than the weights' native one: its own features, its own cache folder
            self.preprocessing["size"] = int(image_size)
        self.key = model_key(backbone, self.weights_sha256, self.preprocessing)
        self.device = resolve_device(device)
        self.autocast = autocast_dtype(self.device) or (torch.bfloat16 if bf16 else None)
        # bf16 (or fp16) features differ from float32 ones by ~1e-1: never mix them. --bf16 off CUDA (CPU, MPS)
        # is its own key; on CUDA cache_suffix names the autocast dtype, which --bf16 does not change.
        chosen_bf16 = self.autocast is not None and autocast_dtype(self.device) is None
        self.key += ("-bf16" if chosen_bf16 else "") + cache_suffix(self.device)
        self.tuned = tuned
        if tuned:
            self.key += f"-tuned{tuned['sha256'][:16]}"
        self.store = ShardStore(Path(cache_dir) / self.key) if cache_dir else MemoryStore()
        self.num_workers, self.batch_size, self.bf16 = num_workers, batch_size, bf16
        self._backbone: Backbone | None = None
        self._inference_model: torch.nn.Module | None = None

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = load_backbone(self.name, self.weights, (self.tuned or {}).get("state"))
        return self._backbone

    @property
    def inference_model(self) -> torch.nn.Module:
        if self._inference_model is None:
            self._inference_model = inference_model(self.backbone.model)  # BatchNorm folded: same features ±1e-5
            if self.device.type != "cpu":
                self._inference_model.to(self.device, memory_format=torch.channels_last)
        return self._inference_model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Every pooling of a batch of preprocessed images: (N, STORED, feature_size)."""
        return forward_chunks(self.inference_model, images, self.autocast, self.device)

    def image_features(self, images: list, *, pooling: str = "avg", tiles: int = 1, tile_pixels: int = 0
                       ) -> np.ndarray:
        """Features (N, width) of decoded RGB images (uploads, say), as extract() gives them: no files, no store."""
        if not images:
            return np.zeros((0, self.width(pooling, tiles)), dtype=np.float32)
        count = tile_count(tiles)
        batch = torch.from_numpy(np.stack([array for image in images for array in
                                           tile_views(image, self.preprocessing, tiles, pixels=tile_pixels)]))
        out = pooled(self.forward(batch), pooling).numpy()
        return combine_tiles(out.reshape(len(images), count, out.shape[1]), pooling)

    def width(self, pooling: str, tiles: int = 1) -> int:
        """The length of one view's feature row for this pooling and tiling (what a head is fed)."""
        if pooling == "regions":  # every region of every tile
            return self.feature_size * REGIONS * tile_count(tiles)
        return self.feature_size

    def extract(self, paths: list[Path], *, views: Sequence[int] = (0,), seed: int = 0, rotation: float = 5.0,
                pooling: str = "avg", tiles: int = 1, tile_pixels: int = 0, progress: bool = False) -> FeatureSet:
        """Features of the given views of each image (0 = plain, k >= 1 augmented), from the store or computed.

        Each (view, tile) is one backbone pass whose every pooling is stored; `pooling` picks one and the tiles
        of a view (tiles > 1: the whole image and a tiles×tiles grid of crops) are combined by max, or for
        regions laid side by side (model.pooling.combine_tiles). tile_pixels > 0: crops of that many pixels
        (model.transforms.pixel_grid); the slots of the K×K left over repeat the whole image, copied, not computed.
        """
        views = list(views)
        pool = SLOTS[pooling]
        per_pass = self.width(pooling)  # one pass's features of this pooling
        per_view = tile_count(tiles)
        columns = [(view, tile) for view in views for tile in range(per_view)]
        count = len(columns)
        tiling = f"-k{tiles}px{tile_pixels}" if tile_pixels else f"-k{tiles}"
        tags = [view_tag(view, seed, rotation) + (f"{tiling}t{tile}" if tile else "") for view, tile in columns]
        shape = (STORED, self.feature_size)
        digests, skipped, readable = [], {}, []
        for path in paths:
            try:
                digests.append(file_digest(path))
                readable.append(Path(path))
            except (StopsignError, OSError) as error:
                skipped[str(path)] = str(error)
        features = allocate((len(readable), count, per_pass), self.store)
        keys = [(digest, tag) for digest in digests for tag in tags]  # row-major: entry row * count + column
        found = np.zeros(len(keys), dtype=bool)
        flat = features.reshape(len(keys), per_pass)
        for positions, arrays in self.store.get_many(keys, shape, select=pool):
            flat[positions] = arrays.reshape(len(arrays), per_pass)
            found[positions] = True
        found = found.reshape(len(readable), count)
        copies = self._left_over(readable, columns, tiles, tile_pixels) if tile_pixels and per_view > 1 else {}
        for row, columns_copied in copies.items():
            found[row, columns_copied] = True  # filled from the whole image's pass below
        missing = {row: np.flatnonzero(~found[row]).tolist() for row in np.flatnonzero(~found.all(axis=1))}
        rows = list(missing)
        computed = 0
        if rows:
            try:
                computed = self._compute(readable, digests, rows, missing, columns, tags, features, skipped,
                                         seed=seed, rotation=rotation, pool=pool, tiles=tiles,
                                         pixels=tile_pixels, progress=progress)
            finally:
                self.store.flush()  # what was computed is committed, also on Ctrl-C
        for row, columns_copied in copies.items():  # column c's whole image is column c - its tile
            features[row, columns_copied] = features[row, [c - columns[c][1] for c in columns_copied]]
        bad_rows = {row for row in rows if str(readable[row]) in skipped}
        if bad_rows:
            keep = [r for r in range(len(readable)) if r not in bad_rows]
            features = features[keep]
            readable = [readable[r] for r in keep]
            digests = [digests[r] for r in keep]
        for path, reason in skipped.items():
            log.warning("skipped %s: %s", path, reason)
        features = np.asarray(features)
        if not readable:  # no paths, or none readable: no rows, of the width a head of this pooling is fed
            features = np.zeros((0, len(views), self.width(pooling, tiles)), dtype=np.float32)
        elif per_view > 1:  # the whole image and its crops, per view: their max, or their regions side by side
            tiled = features.reshape(len(readable) * len(views), per_view, per_pass)
            features = combine_tiles(tiled, pooling).reshape(len(readable), len(views), self.width(pooling, tiles))
        return FeatureSet(readable, digests, features, skipped, computed)

    @staticmethod
    def _left_over(paths: list[Path], columns: list[tuple[int, int]], tiles: int, pixels: int) -> dict[int, list]:
        """{row: its columns whose tile is a slot of the K×K that the image's pixel_grid leaves over}: those repeat
        the whole image, so they are copied from its column rather than computed or stored."""
        copies = {}
        for row, path in enumerate(paths):
            try:
                grid_columns, grid_rows, _ = pixel_grid(*photo_size(path), tiles, pixels)
            except Exception:  # Pillow raises many types on a bad header: the decode names the reason
                continue
            left = [c for c, (_, tile) in enumerate(columns) if tile > grid_columns * grid_rows]
            if left:
                copies[row] = left
        return copies

    def _compute(self, readable, digests, rows, missing, columns, tags, features, skipped, *, seed, rotation, pool,
                 tiles, pixels, progress) -> int:
        """The backbone pass over the views `missing` names, row by row: each written into `features` and the
        store; an image that cannot be decoded lands in `skipped`. Returns the number of views computed."""
        count = len(columns)
        dataset = ViewsDataset(
            [readable[r] for r in rows],
            [[(*view_params(digests[r], columns[c][0], seed, rotation), columns[c][1]) for c in missing[r]]
             for r in rows],
            self.preprocessing, tiles, pixels,
        )
        per_batch = max(1, forward_chunk(self.device, self.preprocessing["size"]) // count)
        workers = decode_workers(self.device, self.num_workers) if len(rows) > per_batch else 0
        in_workers = runs_in_workers(self.device, workers)
        collate = ForwardInWorkers(self.inference_model, self.autocast) if in_workers else list
        computed = 0
        loader = DataLoader(dataset, batch_size=per_batch, num_workers=workers, collate_fn=collate,
                            pin_memory=self.device.type == "cuda")
        with tqdm(total=len(rows), desc="features", unit="img", disable=not progress, leave=False) as bar:
            for batch in loader:
                batch, out = batch if in_workers else (batch, None)
                good = [i for i, tensor, error in batch if error is None]
                for i, _, error in batch:
                    if error is not None:
                        skipped[str(readable[rows[i]])] = error
                if good:
                    if out is None:  # on CUDA each pinned view tensor is copied to the GPU asynchronously
                        out = self.forward(torch.cat([tensor.to(self.device, non_blocking=True)
                                                      for _, tensor, error in batch if error is None]))
                    out = out.numpy()
                    keys, at = [], 0
                    for i in good:
                        row = rows[i]
                        for column in missing[row]:
                            features[row, column] = out[at, pool].reshape(-1)
                            keys.append((digests[row], tags[column]))
                            at += 1
                    self.store.put_many(keys, out)  # a full or read-only cache costs speed, never the run
                    computed += len(out)
                bar.update(len(batch))
        return computed


def forward_chunks(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype | None,
                   device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The backbone over `images` in calls of FORWARD_CHUNK views on the CPU, of as many as the GPU holds on CUDA;
    the features always come back float32 on the CPU."""
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    chunk = FORWARD_CHUNK if device.type == "cpu" else forward_chunk(device, images.shape[-1])
    with torch.inference_mode(), autocast:
        if device.type == "cpu":
            return torch.cat([model(part.contiguous(memory_format=torch.channels_last)).float()
                              for part in images.split(chunk)])
        return torch.cat([model(part.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
                          .float() for part in images.split(chunk)]).cpu()


def runs_in_workers(device: torch.device, workers: int) -> bool:
    """Whether each decode worker runs the backbone on the images it decoded, one thread each (ForwardInWorkers):
    on a CPU with no more cores than workers (bench/bench_pass.py, 2 cores: 0.43 of the floor's time against 0.48
    for the same model run in the main process with 2 threads; on a busy machine 0.36 against 0.86, as a 2-thread
    layer waits for the slower, often descheduled, thread)."""
    return 0 < workers and available_cores() <= workers and device.type == "cpu"


class ForwardInWorkers:
    """A DataLoader collate_fn that runs the backbone in the worker: (index, None, error) items and the features."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None):
        self.model, self.dtype = model, dtype

    def __call__(self, batch: list) -> tuple[list, torch.Tensor | None]:
        tensors = [tensor for _, tensor, error in batch if error is None]
        features = forward_chunks(self.model, torch.cat(tensors), self.dtype) if tensors else None
        return [(index, None, error) for index, _, error in batch], features




def allocate(shape: tuple, store, dtype=np.float32) -> np.ndarray:
    """A zeroed array: in memory up to IN_MEMORY_LIMIT bytes (or with no store folder), else memory-mapped there."""
    if np.prod(shape) * np.dtype(dtype).itemsize <= IN_MEMORY_LIMIT or store.folder is None:
        return np.zeros(shape, dtype=dtype)
    store.folder.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=store.folder, prefix=".tmp-matrix-", suffix=".npy", delete=False)
    handle.close()
    array = np.lib.format.open_memmap(handle.name, mode="w+", dtype=dtype, shape=shape)
    os.unlink(handle.name)  # the mapping keeps the data alive; nothing is left behind on exit
    return array
