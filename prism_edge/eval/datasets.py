"""Loaders for the data sets of the PRISM paper, read through Hugging Face `datasets`.

Sources (all on the Hugging Face hub; install the reader with ``pip install 'prism-edge[data]'``):

======================  ====================  ==================  ==============================
loader                  hub id                configs             splits
======================  ====================  ==================  ==============================
``load_glue``           ``nyu-mll/glue``      sst2, mrpc, stsb    train, validation, test
``load_cifar(10)``      ``uoft-cs/cifar10``   plain_text          train, test
``load_cifar(100)``     ``uoft-cs/cifar100``  cifar100            train, test
``load_imagenet``       ``ILSVRC/imagenet-1k``  (default)         train, validation, test
``load_cbt``            ``cam-cst/cbt``       CN, NE, P, V        train, validation, test
======================  ====================  ==================  ==============================

GLUE and ImageNet test splits carry no labels: their label is -1 (score -1.0 for STS-B).
ImageNet-1k is gated: accept its terms on https://huggingface.co/datasets/ILSVRC/imagenet-1k and log
in with ``hf auth login`` (``huggingface-cli login`` on older huggingface_hub) first.

With ``data_dir=None`` a loader calls ``datasets.load_dataset(hub_id, config, split=split)``; when a
``limit`` is given (and always for ImageNet, whose train split alone is ~140 GB) it streams the split
instead, so only the shards it reads are downloaded.

With ``data_dir`` nothing is downloaded. ``data_dir`` may be

* a copy of the hub repository's parquet files, laid out as on the hub::

      glue:      DIR/<task>/<split>-*.parquet          e.g. DIR/sst2/validation-00000-of-00001.parquet
      cifar10:   DIR/plain_text/<split>-*.parquet
      cifar100:  DIR/cifar100/<split>-*.parquet
      imagenet:  DIR/data/<split>-*.parquet
      cbt:       DIR/<config>/<split>-*.parquet        e.g. DIR/CN/test-00000-of-00001.parquet

  (``DIR/<split>-*.parquet`` directly, and the hub's ``refs/convert/parquet`` layout
  ``DIR/<config>/<split>/*.parquet``, are accepted too); such a copy is what
  ``hf download <hub id> --repo-type dataset --local-dir DIR`` writes;
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (it holds
  ``state.json`` or ``dataset_dict.json``), directly in DIR or in ``DIR/<config>``, e.g. made on a
  machine with internet by
  ``python -c "import datasets; datasets.load_dataset('nyu-mll/glue','sst2').save_to_disk('DIR')"``.

Local parquet files are read with ``datasets.load_dataset("parquet", data_files=..., streaming=True)``
(no copy into the cache); saved folders with ``datasets.load_from_disk``. Nothing is unpickled.
Images are the hub's ``Image`` feature (PNG/JPEG bytes), decoded here with PIL and converted to RGB.

Every failure raises a one-line :class:`DatasetLoadError` (a ``ValueError``) that says what to do.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    import torch

INSTALL_HINT = "pip install 'prism-edge[data]'  (or: pip install datasets pillow)"
IMAGENET_TERMS = ("ImageNet-1k is gated: accept its terms at https://huggingface.co/datasets/ILSVRC/imagenet-1k "
                  "while logged in, then run `hf auth login` (`huggingface-cli login` on older huggingface_hub)")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

# What each data set is, for `prism-edge` to list. "layout" is the data_dir layout of its parquet files.
DATASETS: dict[str, dict[str, Any]] = {
    "glue": {
        "loader": "load_glue",
        "hub_id": "nyu-mll/glue",
        "configs": ("sst2", "mrpc", "stsb"),
        "splits": ("train", "validation", "test"),
        "layout": "DIR/<task>/<split>-*.parquet",
        "rows": {
            "sst2": "{'text': str, 'label': int (0 negative, 1 positive; -1 on test)}",
            "mrpc": "{'text_a': str, 'text_b': str, 'label': int (1 = paraphrase; -1 on test)}",
            "stsb": "{'text_a': str, 'text_b': str, 'score': float in 0..5 (-1.0 on test)}",
        },
        "description": "GLUE sentence tasks: SST-2 sentiment, MRPC paraphrase, STS-B similarity",
    },
    "cifar10": {
        "loader": "load_cifar(classes=10)",
        "hub_id": "uoft-cs/cifar10",
        "configs": ("plain_text",),
        "splits": ("train", "test"),
        "layout": "DIR/plain_text/<split>-*.parquet",
        "rows": "(images uint8 (N, 32, 32, 3), labels int64 (N,), 10 class names)",
        "description": "CIFAR-10: 60k 32x32 colour images in 10 classes (columns img, label)",
    },
    "cifar100": {
        "loader": "load_cifar(classes=100)",
        "hub_id": "uoft-cs/cifar100",
        "configs": ("cifar100",),
        "splits": ("train", "test"),
        "layout": "DIR/cifar100/<split>-*.parquet",
        "rows": "(images uint8 (N, 32, 32, 3), fine labels int64 (N,), 100 class names)",
        "description": "CIFAR-100: 60k 32x32 colour images in 100 classes (columns img, fine_label, coarse_label)",
    },
    "imagenet": {
        "loader": "load_imagenet",
        "hub_id": "ILSVRC/imagenet-1k",
        "configs": (),
        "splits": ("train", "validation", "test"),
        "layout": "DIR/data/<split>-*.parquet",
        "rows": "(images uint8 (N, size, size, 3) resized + centre-cropped, labels int64 (N,) (-1 on test), "
                "1000 class names or None)",
        "description": "ImageNet-1k (ILSVRC 2012), gated on the hub (columns image, label)",
    },
    "cbt": {
        "loader": "load_cbt",
        "hub_id": "cam-cst/cbt",
        "configs": ("CN", "NE", "P", "V"),
        "splits": ("train", "validation", "test"),
        "layout": "DIR/<config>/<split>-*.parquet",
        "rows": "{'context': list[str] (20 sentences), 'question': str with 'XXXXX', "
                "'options': list[str] (10), 'answer': str}",
        "description": "Children's Book Test: fill the XXXXX gap (CN common nouns, NE named entities, "
                       "P prepositions, V verbs)",
    },
}


class DatasetLoadError(ValueError):
    """A data set could not be loaded; the (one-line) message says what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# --- plumbing ------------------------------------------------------------------------------------


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise DatasetLoadError(f"these loaders need the Hugging Face `datasets` package ({e}); run: {INSTALL_HINT}")
    return datasets


def _check(kind: str, value: Any, valid: Iterable[Any]) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise DatasetLoadError(f"unknown {kind} {value!r}; valid: {', '.join(map(str, valid))}")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _unreachable(e: BaseException) -> bool:
    """Whether `e` (or what caused it) says the hub could not be contacted."""
    names = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "ReadTimeout",
             "ProxyError", "NameResolutionError", "MaxRetryError", "NewConnectionError"}
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (ConnectionError, TimeoutError)) or type(cur).__name__ in names:
            return True
        if "couldn't reach" in str(cur).lower() or "offline mode" in str(cur).lower():
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _download_hint(name: str, config: str | None, split: str) -> str:
    hub_id = DATASETS[name]["hub_id"]
    if name == "imagenet":
        return (f"download on a machine with internet, e.g. `hf download {hub_id} --repo-type dataset "
                f"--include '*{split}-*' --local-dir DIR`, copy DIR here and pass data_dir=DIR")
    args = f"'{hub_id}','{config}'" if config else f"'{hub_id}'"
    return ("download on a machine with internet, e.g. "
            f"python -c \"import datasets; datasets.load_dataset({args}).save_to_disk('DIR')\", "
            "copy DIR here and pass data_dir=DIR")


def _layouts(name: str, config: str | None, split: str, data_dir: Path) -> str:
    sub = {"cifar10": "plain_text", "cifar100": "cifar100", "imagenet": "data"}.get(name, config)
    return (f"{data_dir}/{sub}/{split}-*.parquet (as in the hub repo {DATASETS[name]['hub_id']}), "
            f"{data_dir}/{split}-*.parquet, or a folder written by save_to_disk (holding dataset_dict.json "
            f"or state.json) in {data_dir} or {data_dir}/{sub}")


def _parquet_files(name: str, config: str | None, split: str, root: Path) -> list[str]:
    subs = [{"cifar10": "plain_text", "cifar100": "cifar100", "imagenet": "data"}.get(name, config)]
    if name == "imagenet":
        subs.append("default")  # refs/convert/parquet
    for sub in [*subs, None]:
        base = root / sub if sub else root
        for pattern in (f"{split}-*.parquet", f"{split}/*.parquet", f"*-{split}.parquet", f"*-{split}-*.parquet"):
            files = sorted(str(p) for p in base.glob(pattern) if p.is_file())
            if files:
                return files
    return []


def _saved_folder(name: str, config: str | None, root: Path) -> Path | None:
    sub = {"cifar10": "plain_text", "cifar100": "cifar100", "imagenet": "data"}.get(name, config)
    for folder in (root, root / sub) if sub else (root,):
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            return folder
    return None


def _load(name: str, config: str | None, split: str, data_dir: str | Path | None, limit: int | None,
          columns: tuple[str, ...], convert: Callable[[dict], Any], image_column: str | None = None):
    """Open the split, check its columns, and return ([convert(row) for its first `limit` rows], features)."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise DatasetLoadError(f"limit must be a non-negative int or None, got {limit!r}")
    ds_lib = _datasets()
    hub_id = DATASETS[name]["hub_id"]
    where = f"{hub_id} ({config + ', ' if config else ''}split {split})"

    if data_dir is None:
        stream = limit is not None or name == "imagenet"
        try:
            ds = ds_lib.load_dataset(hub_id, config, split=split, streaming=stream)
            return _convert_rows(ds, where, limit, columns, convert, image_column, ds_lib)
        except DatasetLoadError:
            raise
        except Exception as e:
            gated = f"; {IMAGENET_TERMS}" if name == "imagenet" else ""
            hint = _download_hint(name, config, split)
            if _unreachable(e):
                raise DatasetLoadError(f"the Hugging Face hub could not be reached to load {where} "
                                       f"({_one_line(e)}){gated}; {hint}") from e
            raise DatasetLoadError(f"loading {where} from the Hugging Face hub failed ({_one_line(e)}){gated}; "
                                   f"or {hint}") from e

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetLoadError(f"data_dir {root} does not exist or is not a folder; expected "
                               f"{_layouts(name, config, split, root)}")
    saved = _saved_folder(name, config, root)
    try:
        if saved is not None:
            ds = ds_lib.load_from_disk(str(saved))
            if isinstance(ds, ds_lib.DatasetDict):
                if split not in ds:
                    raise DatasetLoadError(f"{saved} (saved with save_to_disk) has no split {split!r}; "
                                           f"it has: {', '.join(ds)}")
                ds = ds[split]
            where = f"{saved} (save_to_disk folder of {where})"
        else:
            files = _parquet_files(name, config, split, root)
            if not files:
                raise DatasetLoadError(f"no {split} data of {hub_id}{' ' + config if config else ''} in {root}; "
                                       f"expected {_layouts(name, config, split, root)}")
            ds = ds_lib.load_dataset("parquet", data_files={split: files}, split=split, streaming=True)
            where = f"{len(files)} parquet file(s) {files[0]}{', ...' if len(files) > 1 else ''}"
        return _convert_rows(ds, where, limit, columns, convert, image_column, ds_lib)
    except DatasetLoadError:
        raise
    except Exception as e:
        raise DatasetLoadError(f"could not read {where} ({_one_line(e)}); expected "
                               f"{_layouts(name, config, split, root)}") from e


def _convert_rows(ds, where: str, limit: int | None, columns: tuple[str, ...], convert, image_column, ds_lib):
    features = getattr(ds, "features", None)
    if features is not None:
        missing = [c for c in columns if c not in features]
        if missing:
            raise DatasetLoadError(f"{where} lacks column(s) {', '.join(missing)}: it has {', '.join(features)}, "
                                   f"expected {', '.join(columns)} (is it the right data set / config?)")
        if image_column is not None and isinstance(features[image_column], ds_lib.Image):
            ds = ds.cast_column(image_column, ds_lib.Image(decode=False))  # decode here, with PIL
    out = []
    for row in itertools.islice(ds, limit):
        missing = [c for c in columns if c not in row]
        if missing:
            raise DatasetLoadError(f"{where} lacks column(s) {', '.join(missing)}: expected {', '.join(columns)}")
        out.append(convert(row))
    return out, features


def _class_names(features, column: str) -> list[str] | None:
    feature = features.get(column) if features is not None else None
    names = getattr(feature, "names", None)
    return list(names) if names else None


def _pil(value, where: str):
    """An RGB PIL image from an Image-feature cell: {'bytes', 'path'} dict, raw bytes, or a PIL image."""
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            img = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            img = Image.open(value["path"])
        elif isinstance(value, (bytes, bytearray)):
            img = Image.open(io.BytesIO(value))
        else:
            raise TypeError(f"not an image cell: {type(value).__name__}")
        return img.convert("RGB")
    except Exception as e:
        raise DatasetLoadError(f"could not decode an image of {where} ({_one_line(e)})") from e


def _stack(images: list, labels: list[int], shape: tuple[int, int]):
    import numpy as np
    import torch

    if not images:
        return torch.zeros((0, *shape, 3), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


# --- loaders -------------------------------------------------------------------------------------


def load_glue(task: str, split: str = "validation", data_dir: str | Path | None = None,
              limit: int | None = None) -> list[dict]:
    """Rows of a GLUE task (``nyu-mll/glue``): sst2, mrpc or stsb.

    sst2 -> {"text", "label": int}; mrpc -> {"text_a", "text_b", "label": int};
    stsb -> {"text_a", "text_b", "score": float in 0..5}. Test labels are hidden (-1).
    Local layout: ``data_dir/<task>/<split>-*.parquet`` or a save_to_disk folder.
    """
    spec = DATASETS["glue"]
    _check("GLUE task", task, spec["configs"])
    _check("GLUE split", split, spec["splits"])

    def convert(r: dict) -> dict:
        if task == "sst2":
            return {"text": str(r["sentence"]), "label": int(r["label"])}
        pair = {"text_a": str(r["sentence1"]), "text_b": str(r["sentence2"])}
        return {**pair, "label": int(r["label"])} if task == "mrpc" else {**pair, "score": float(r["label"])}

    columns = ("sentence", "label") if task == "sst2" else ("sentence1", "sentence2", "label")
    rows, _ = _load("glue", task, split, data_dir, limit, columns, convert)
    return rows


def load_cifar(classes: int = 10, split: str = "test", data_dir: str | Path | None = None,
               limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images uint8 (N, 32, 32, 3), labels int64 (N,), class names) of CIFAR-10 or CIFAR-100.

    CIFAR-100 labels are the 100 fine labels. Local layout: ``data_dir/plain_text/<split>-*.parquet``
    (CIFAR-10), ``data_dir/cifar100/<split>-*.parquet`` (CIFAR-100), or a save_to_disk folder.
    """
    _check("CIFAR classes", classes, (10, 100))
    name = f"cifar{classes}"
    _check(f"CIFAR-{classes} split", split, DATASETS[name]["splits"])
    label = "label" if classes == 10 else "fine_label"
    where = DATASETS[name]["hub_id"]

    def convert(row):
        import numpy as np

        img = _pil(row["img"], where)
        if img.size != (32, 32):
            raise DatasetLoadError(f"{where}: expected 32x32 CIFAR images, got {img.size[0]}x{img.size[1]}")
        return np.asarray(img, dtype=np.uint8), int(row[label])

    rows, features = _load(name, DATASETS[name]["configs"][0], split, data_dir, limit, ("img", label), convert,
                           image_column="img")
    images, labels = _stack([r[0] for r in rows], [r[1] for r in rows], (32, 32))
    names = _class_names(features, label) or list(CIFAR10_CLASSES if classes == 10 else CIFAR100_CLASSES)
    return images, labels, names


def _resize_crop(img, size: int, shorter: int):
    """Resize so the shorter side is `shorter` (bilinear, antialiased), then centre-crop size x size."""
    import numpy as np
    from PIL import Image

    w, h = img.size
    scale = shorter / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_imagenet(split: str = "validation", data_dir: str | Path | None = None, limit: int | None = None,
                  size: int = 224, resize_to: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """(images uint8 (N, size, size, 3), labels int64 (N,), class names or None) of ImageNet-1k.

    Each image is resized so its shorter side is `resize_to` (default `size`; 256 with size 224 gives
    the classic 256 -> 224 protocol) and centre-cropped to size x size. Test labels are -1.
    Gated on the hub: accept the terms at https://huggingface.co/datasets/ILSVRC/imagenet-1k and log in
    (`hf auth login`). Local layout: ``data_dir/data/<split>-*.parquet`` or a save_to_disk folder.
    """
    _check("ImageNet split", split, DATASETS["imagenet"]["splits"])
    if not isinstance(size, int) or size < 1:
        raise DatasetLoadError(f"size must be a positive int, got {size!r}")
    shorter = size if resize_to is None else resize_to
    if not isinstance(shorter, int) or shorter < size:
        raise DatasetLoadError(f"resize_to must be an int >= size ({size}), got {resize_to!r}")
    where = DATASETS["imagenet"]["hub_id"]

    def convert(row):
        return _resize_crop(_pil(row["image"], where), size, shorter), int(row["label"])

    rows, features = _load("imagenet", None, split, data_dir, limit, ("image", "label"), convert,
                           image_column="image")
    images, labels = _stack([r[0] for r in rows], [r[1] for r in rows], (size, size))
    return images, labels, _class_names(features, "label")


def load_cbt(config: str = "CN", split: str = "test", data_dir: str | Path | None = None,
             limit: int | None = None) -> list[dict]:
    """Children's Book Test (``cam-cst/cbt``) questions.

    Rows: {"context": list[str] (20 sentences), "question": str containing "XXXXX",
    "options": list[str] (10 candidates), "answer": str (one of the options)}.
    Local layout: ``data_dir/<config>/<split>-*.parquet`` or a save_to_disk folder.
    """
    spec = DATASETS["cbt"]
    _check("CBT config", config, spec["configs"])
    _check("CBT split", split, spec["splits"])

    def convert(row):
        return {"context": [str(s) for s in row["sentences"]], "question": str(row["question"]),
                "options": [str(o) for o in row["options"]], "answer": str(row["answer"])}

    rows, _ = _load("cbt", config, split, data_dir, limit, ("sentences", "question", "answer", "options"), convert)
    return rows
