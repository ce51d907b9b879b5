"""What the embedded toy CLIP does on real images: Fashion-MNIST or MNIST as an image folder, few-shot bench.

The embedded model was pretrained on the procedural toy world only. This script measures what its prompts can
and cannot learn on real (if small, grey) photos, for docs/first_hour.md:

    python benchmarks/real_images_check.py --idx-dir DIR --names fashion --output /tmp/real_fashion

DIR holds the four files of the IDX release (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz), e.g. Debian's dataset-fashion-mnist package
(/usr/share/datasets/fashion-mnist). A class-balanced subset is written as ``<output>/data/{train,test}/<class>/``
PNGs, then ``vlprompt bench`` runs on it with the embedded model and its own recipe.
"""
from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = {
    "fashion": ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"],
    "digits": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
}
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}  # fmt: skip


def read_idx(images_file: Path, labels_file: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(images_file) as fh:
        _, count, rows, cols = struct.unpack(">IIII", fh.read(16))
        images = np.frombuffer(fh.read(), dtype=np.uint8).reshape(count, rows, cols)
    with gzip.open(labels_file) as fh:
        _, count = struct.unpack(">II", fh.read(8))
        labels = np.frombuffer(fh.read(), dtype=np.uint8)
    return images, labels


def write_image_folder(idx_dir: Path, names: list[str], out: Path, per_class: dict[str, int]) -> None:
    """The first ``per_class[split]`` images of each class of each split, as PNGs (written once)."""
    for split, (images_file, labels_file) in FILES.items():
        images, labels = read_idx(idx_dir / images_file, idx_dir / labels_file)
        for label, name in enumerate(names):
            folder = out / split / name.replace(" ", "_")
            if folder.is_dir() and len(list(folder.iterdir())) == per_class[split]:
                continue
            folder.mkdir(parents=True, exist_ok=True)
            for i, index in enumerate(np.flatnonzero(labels == label)[: per_class[split]]):
                Image.fromarray(images[index], mode="L").save(folder / f"{i:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idx-dir", required=True, type=Path)
    parser.add_argument("--names", choices=sorted(NAMES), default="fashion")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--train-per-class", type=int, default=40, help="a seeded 20%% of them become val")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--methods", nargs="+",
                        default=["zeroshot", "linear_probe", "coop", "coop_csc", "vpt_deep", "maple"])
    parser.add_argument("--shots", nargs="+", type=int, default=[16])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    args = parser.parse_args()

    from vlprompt.protocols.report import markdown_report
    from vlprompt.protocols.runner import BenchConfig, run_bench
    from vlprompt.recipes import Recipe

    data = args.output / "data"
    write_image_folder(args.idx_dir, NAMES[args.names], data,
                       {"train": args.train_per_class, "test": args.test_per_class})  # fmt: skip
    # coop_csc: class-specific CoOp, a context per class (the one prompt variant that is not shared by classes)
    methods = ["coop" if m == "coop_csc" else m for m in args.methods]
    if "coop_csc" in args.methods and "coop" in args.methods:
        raise SystemExit("pick coop or coop_csc: the bench names runs by method")
    recipes = {"coop": Recipe(method_options={"class_specific": True})} if "coop_csc" in args.methods else {}
    config = BenchConfig(methods=methods, datasets=[f"imagefolder:{data}"], shots=args.shots, seeds=args.seeds,
                         model="embedded", output=str(args.output / "bench"), recipes=recipes)  # fmt: skip
    rows = run_bench(config)
    print(markdown_report(rows, config.methods, title=f"embedded toy CLIP on {args.names} images"))


if __name__ == "__main__":
    main()
