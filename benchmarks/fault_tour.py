#!/usr/bin/env python
"""Fault tour: the mistakes a new user makes with the vlprompt CLI, each run as that user would, with what it prints.

A reviewer tried about 150 faults a new user can make (unknown names and typos, wrong --set keys and types, broken
config and recipe files, run folders, eval/predict inputs, image folder layouts, precision, detection and
classification mixed up, benches, params/methods). This script rebuilds the inputs those faults need in a scratch
folder and runs a selection of them with the ``vlprompt`` executable next to ``sys.executable``, one subprocess each,
from that folder. For every case it records:

- the command (relative to the scratch folder) and its exit code;
- the message: the first stderr line that starts with ``vlprompt `` (else the last stderr line);
- files: for faults where something the user had could be lost (a finished run folder, a bench's results.csv and
  bench_config.json, a file passed as --output, the user's own files in a run folder), a hash of those files
  before and after: ``kept`` or ``CHANGED`` (a run folder's .vlprompt.lock, which names the process writing it, is
  left out);
- a verdict against the case's expectation:
  - ``error``: exit 2 and one line ``vlprompt <command>: error: ...`` (argparse's usage lines may come before it;
    no traceback, no line after it);
  - ``ok``: exit 0, no traceback;
  - ``warning``: exit 0 and a ``vlprompt <command>: warning: ...`` line;
  and, for every case, guarded files kept. Anything else is in bold: a traceback, an exit 0 where an error was
  expected, a message over several lines, a changed file.

Usage::

    python benchmarks/fault_tour.py --output /tmp/fault_tour              # every case (minutes on 2 CPU cores)
    python benchmarks/fault_tour.py --output /tmp/fault_tour --only b      # the bench cases only
    python benchmarks/fault_tour.py --output /tmp/fault_tour --only f3     # f3, f30, f31, ...

Prints a markdown table (| id | fault | command | exit | message | files | verdict |) and writes it to
``<output>/fault_tour.md``; each case's full stdout/stderr is kept in ``<output>/out/<id>.out|.err``. Progress goes
to stderr. Runs are tiny: the embedded toy CLIP or random:tiny, toy:shapes, 1 epoch, 1-2 shots.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

VLPROMPT = Path(sys.executable).with_name("vlprompt")
CASE_TIMEOUT_S = 240
SETUP_TIMEOUT_S = 300
LOCK_FILE = ".vlprompt.lock"  # names the process writing a run folder: vlprompt's, not the user's; not hashed
PROGRESS_BAR = re.compile(r"(it/s\]|s/it\]|\d+%\|)")


# ---------------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    id: str
    fault: str
    command: str  # the arguments after `vlprompt`, as a user types them in the scratch folder
    expect: str = "error"  # "error", "ok" or "warning"
    guard: tuple[str, ...] = ()  # paths (files or folders) whose files must be kept as they were
    needs: tuple[str, ...] = ()  # fixtures to build first (see FIXTURES)

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.command)

    @property
    def subcommand(self) -> str:
        return self.argv[0]


TINY = "--shots 1 --epochs 1 --quiet"
TRAIN = f"train --method coop {TINY}"  # the tiny run most train faults start from
BASE = "train --method coop --shots 2 --epochs 1 --quiet --output runs/base"  # how runs/base was trained
INTR = "train --method coop --shots 2 --epochs 50 --quiet"  # how runs/interrupted was started (killed after epoch 2+)
# bench/done ran this with --set default_train.epochs=1
BENCH = "bench --methods coop --datasets toy:shapes --shots 1 --seeds 1"

CASES: list[Case] = [
    # -- unknown names and typos ------------------------------------------------------------------------------------
    Case("f01", "a typo in the method name", f"train --method copo {TINY} --output runs/f01"),
    Case("f02", "a typo in a toy dataset name", f"{TRAIN} --dataset toy:shape --output runs/f02"),
    Case("f03", "a typo in a dataset name", f"{TRAIN} --dataset eurosatt --output runs/f03"),
    Case("f04", "a real dataset without --data-root", f"{TRAIN} --dataset eurosat --output runs/f04"),
    Case("f05", "a typo in the model name", f"{TRAIN} --model embeded --output runs/f05"),
    Case("f06", "a typo in a random preset", f"{TRAIN} --model random:tinny --output runs/f06"),
    Case("r01", "a typo in a recipe name", f"{TRAIN} --recipe fieldd --output runs/r01"),
    Case("b12", "a typo in a bench method", "bench --methods zeroshot copo --datasets toy:shapes --shots 1 --seeds 1 "
         "--output bench/b12"),
    Case("p07", "a typo in the model of `methods`", "methods --model random:tinny"),
    # -- --set keys and wrong types ---------------------------------------------------------------------------------
    Case("f07", "an unknown top-level --set key", f"{TRAIN} --output runs/f07 --set foo=1"),
    Case("f08", "a typo in a train option", f"{TRAIN} --output runs/f08 --set train.lrr=0.1"),
    Case("f09", "a word where a number belongs", f"{TRAIN} --output runs/f09 --set train.lr=abc"),
    Case("f11", "zero shots through --set", f"{TRAIN} --output runs/f11 --set data.shots=0"),
    Case("f13", "nan as the learning rate", f"{TRAIN} --output runs/f13 --set train.lr=nan"),
    Case("f14", "a list where an integer belongs", f"{TRAIN} --output runs/f14 --set 'train.batch_size=[1,2]'"),
    Case("f83", "a value where a section belongs", f"{TRAIN} --output runs/f83 --set train=5"),
    Case("f121", "YAML's `on` (a boolean) where a string belongs", f"{TRAIN} --output runs/f121 --set method.init=on"),
    # -- config files -----------------------------------------------------------------------------------------------
    Case("f19", "a config file that does not exist", f"{TRAIN} --output runs/f19 --config cfg/missing.yaml"),
    Case("f20", "a folder as the config file", f"{TRAIN} --output runs/f20 --config cfg"),
    Case("f21", "a config file that is not valid YAML", f"{TRAIN} --output runs/f21 --config cfg/bad.yaml"),
    Case("f22", "a config file holding a list", f"{TRAIN} --output runs/f22 --config cfg/list.yaml"),
    Case("f23", "an unknown top-level key in a config file", f"{TRAIN} --output runs/f23 --config cfg/unknown.yaml"),
    Case("f24", "a scalar `data: toy:shapes` section, with data flags", f"{TRAIN} --output runs/f24 "
         "--config cfg/datastr.yaml"),
    Case("f24c", "a scalar `data: toy:colours` section, no data flags",
         "train --method coop --quiet --output runs/f24c --config cfg/datastr3.yaml"),
    Case("f25", "`model:` given as a list in a config file", f"{TRAIN} --output runs/f25 --config cfg/modellist.yaml"),
    Case("f26", "a typo in a data option of a config file", f"{TRAIN} --output runs/f26 --config cfg/datakey.yaml"),
    # -- outputs and models that are files or not models ------------------------------------------------------------
    Case("f27", "an existing file as --output", f"{TRAIN} --output afile.txt", guard=("afile.txt",)),
    Case("f77", "a path under a file as --output", f"{TRAIN} --output afile.txt/sub", guard=("afile.txt",)),
    Case("f94", "a file as --model", f"{TRAIN} --model afile.txt --output runs/f94", guard=("afile.txt",)),
    Case("f93", "a run folder as --model", f"{TRAIN} --model runs/base --output runs/f93", guard=("runs/base",),
         needs=("base",)),
    Case("f99", "a model folder whose vlprompt_recipe.json is corrupt", f"{TRAIN} --model ./fm4 --output runs/f99",
         needs=("models",)),
    # -- run folders: finished, resumed, interrupted ----------------------------------------------------------------
    Case("f30", "training again into a finished run", BASE, guard=("runs/base",), needs=("base",)),
    Case("f29", "--resume of a finished run with its own settings", f"{BASE} --resume", expect="ok",
         guard=("runs/base",), needs=("base",)),
    Case("f31", "--resume of a finished run with another method",
         "train --method vpt_deep --shots 2 --epochs 1 --quiet --output runs/base --resume", guard=("runs/base",),
         needs=("base",)),
    Case("f33", "--resume of a finished run with another learning rate",
         "train --method coop --shots 2 --epochs 1 --lr 0.5 --quiet --output runs/base --resume",
         guard=("runs/base",), needs=("base",)),
    Case("f34", "--resume of a finished run with other shots",
         "train --method coop --shots 4 --epochs 1 --quiet --output runs/base --resume", guard=("runs/base",),
         needs=("base",)),
    Case("f116", "--resume of an interrupted run with fewer epochs than it trained",
         "train --method coop --shots 2 --epochs 1 --quiet --output runs/intr_fewer --resume",
         guard=("runs/intr_fewer",), needs=("interrupted",)),
    Case("f115", "--resume with a corrupt checkpoint-last/state.json", f"{INTR} --output runs/intr_corrupt --resume",
         guard=("runs/intr_corrupt",), needs=("interrupted",)),
    Case("f81", "--resume and --overwrite together",
         "train --method coop --shots 2 --epochs 1 --quiet --output mydir --resume --overwrite", guard=("mydir",),
         needs=("mydir",)),
    Case("f80", "--overwrite of a run folder that also holds the user's own files",
         "train --method coop --shots 1 --epochs 1 --quiet --output mydir --overwrite", expect="ok",
         guard=("mydir/important.txt", "mydir/sub"), needs=("mydir",)),
    # -- eval and predict -------------------------------------------------------------------------------------------
    Case("f35", "eval of a folder that is not a run", "eval notarun"),
    Case("f37b", "eval of a folder that does not exist", "eval runs/doesnotexist"),
    Case("f38", "eval of a run whose prompt.safetensors is missing", "eval runs/half1", needs=("half",)),
    Case("f39", "eval of a run whose prompt.safetensors is empty", "eval runs/half2", needs=("half",)),
    Case("f40", "eval of an interrupted run", "eval runs/interrupted", needs=("interrupted",)),
    Case("f43", "eval on a backbone of another architecture", "eval runs/base --model random:tiny", needs=("base",)),
    Case("f44", "predict on an image that does not exist", "predict runs/base imgs/nope.png", needs=("base",)),
    Case("f45", "predict on a text file named x.png", "predict runs/base imgs/x.png", needs=("base",)),
    Case("f46", "predict on an empty .png", "predict runs/base imgs/empty.png", needs=("base",)),
    Case("f50", "predict on a folder of images", "predict runs/base imgs", needs=("base",)),
    Case("f47", "predict --k 0", "predict runs/base imgs/good.png --k 0", needs=("base",)),
    Case("f49", "predict --k -2", "predict runs/base imgs/good.png --k -2", needs=("base",)),
    Case("f71", "eval with method options it does not use",
         "eval runs/base --set method=vpt_deep --set method_options.n_ctx=4", needs=("base",)),
    Case("f76", "eval with a training flag (--shots)", "eval runs/base --split val --shots 2", needs=("base",)),
    Case("f85", "eval of a run whose image folder was moved away", "eval runs/moved", needs=("moved",)),
    # -- image folders ----------------------------------------------------------------------------------------------
    Case("f52", "an image folder without splits (class folders at its top)", f"{TRAIN} --dataset imagefolder:img_flat "
         "--output runs/f52", expect="ok", needs=("folders",)),
    Case("f53", "an empty class folder in train/", f"{TRAIN} --dataset imagefolder:img_emptyclass --output runs/f53",
         needs=("folders",)),
    Case("f54", "a class in test/ that train/ lacks", f"{TRAIN} --dataset imagefolder:img_extraclass "
         "--output runs/f54", needs=("folders",)),
    Case("f122", "a file where a class folder should be", f"{TRAIN} --dataset imagefolder:img_fileclass "
         "--output runs/f122", needs=("folders",)),
    Case("f55", "an image folder with one class", f"{TRAIN} --dataset imagefolder:img_oneclass --output runs/f55",
         needs=("folders",)),
    Case("f56", "an image folder with train/ only", f"{TRAIN} --dataset imagefolder:img_onlytrain "
         "--output runs/f56", needs=("folders",)),
    Case("f123", "an image folder with test/ but no train/", f"{TRAIN} --dataset imagefolder:img_notrain "
         "--output runs/f123", needs=("folders",)),
    Case("f57", "an image folder that does not exist", f"{TRAIN} --dataset imagefolder:nowhere --output runs/f57"),
    Case("f113", "a corrupt image in train/ (no --shots: every image is read)",
         "train --method coop --epochs 1 --quiet --dataset imagefolder:img_corrupt --output runs/f113",
         needs=("folders",)),
    Case("f100", "--shots 16 on classes of 6 training images", "train --method coop --shots 16 --epochs 1 --quiet "
         "--dataset imagefolder:img_split --output runs/f100", expect="warning", needs=("folders",)),
    # -- precision --------------------------------------------------------------------------------------------------
    Case("f61", "train --precision fp16 on a CPU", f"{TRAIN} --precision fp16 --output runs/f61"),
    Case("f62", "eval --precision fp16 on a CPU", "eval runs/base --precision fp16", needs=("base",)),
    Case("b30", "bench --precision fp16 on a CPU", "bench --methods zeroshot --datasets toy:shapes --shots 1 --seeds 1 "
         "--precision fp16 --output bench/b30"),
    # -- detection and classification mixed up ----------------------------------------------------------------------
    Case("f63", "a detection method on a classification dataset",
         f"train --method det_coop {TINY} --dataset toy:shapes --output runs/f63"),
    Case("f64", "sdpt_native on a detector model, classification dataset", f"train --method sdpt_native {TINY} "
         "--dataset toy:shapes --model random:grounding-dino-micro --output runs/f64"),
    Case("f65", "a classification method on a detection dataset", f"{TRAIN} --dataset toydet:shapes "
         "--output runs/f65"),
    Case("f66", "a detection method on the CLIP model", f"train --method det_coop {TINY} --dataset toydet:shapes "
         "--output runs/f66"),
    Case("f70", "eval of a classification run on a detection dataset", "eval runs/base --dataset toydet:shapes",
         needs=("base",)),
    # -- bench ------------------------------------------------------------------------------------------------------
    Case("b01", "bench --shots 0", "bench --methods zeroshot --datasets toy:shapes --shots 0 --seeds 1 "
         "--output bench/b01"),
    Case("b02", "a train option at the top level of a bench", "bench --methods zeroshot coop --datasets toy:shapes "
         "--shots 1 --seeds 1 --output bench/b02 --set epochs=1"),
    Case("b31", "the same method and dataset twice", "bench --methods zeroshot zeroshot --datasets toy:shapes "
         "toy:shapes --shots 1 --seeds 1 --output bench/b31"),
    Case("b31s", "the same seed twice", "bench --methods zeroshot --datasets toy:shapes --shots 1 --seeds 1 1 "
         "--output bench/b31s"),
    Case("b27", "an unknown key in a bench config file", "bench --config cfg/bench_unk.yaml --output bench/b27"),
    Case("b18", "a typo in a method's recipe train option", f"{BENCH} --output bench/b18 "
         "--set default_train.epochs=1 --set recipes.coop.train.lrr=0.5"),
    Case("b09", "crossdataset with one dataset", "bench --methods zeroshot --datasets toy:shapes "
         "--protocols crossdataset --shots 1 --seeds 1 --output bench/b09"),
    Case("b11", "base2novel with --shots (a note on stdout: it trains at b2n_shots)",
         "bench --methods zeroshot --datasets toy:shapes --protocols base2novel --shots 1 --seeds 1 --output bench/b11",
         expect="ok"),
    Case("b04", "--report-only on an empty folder", "bench --report-only --output bench/empty"),
    Case("b06", "--report-only in a precision the bench did not run", "bench --report-only --output bench/done "
         "--precision bf16", guard=("bench/done",), needs=("bench",)),
    Case("b07", "--report-only on a bench without results.csv", "bench --report-only --output bench/nocsv",
         guard=("bench/nocsv",), needs=("bench",)),
    Case("b08", "--report-only with a method the bench did not run (named on stdout)",
         "bench --report-only --output bench/report --methods coop maple", expect="ok",
         guard=("bench/report/results.csv", "bench/report/bench_config.json"), needs=("bench",)),
    Case("b20", "a bench rerun with changed settings", f"{BENCH} --set default_train.epochs=2 --output bench/done",
         guard=("bench/done",), needs=("bench",)),
    Case("b22", "an existing file as bench --output", "bench --methods zeroshot --datasets toy:shapes --shots 1 "
         "--seeds 1 --output afile.txt", guard=("afile.txt",)),
    # -- params, methods, pretrain-toy, demo ------------------------------------------------------------------------
    Case("p01", "params with a typo in a method", "params --model random:tiny --methods copo"),
    Case("p04", "params --set method.* without --methods", "params --model random:tiny --set method.n_ctx=4"),
    Case("p05", "params with options it does not read", "params --model random:tiny --methods coop "
         "--set train.lr=0.1 --set foo=1"),
    Case("t01", "a typo in a pretrain-toy option", "pretrain-toy --output ptoy --set stepz=10"),
    Case("t03", "an existing file as pretrain-toy --output", "pretrain-toy --output afile.txt --set steps=1",
         guard=("afile.txt",)),
    Case("d01", "an existing file as demo --output", "demo --output afile.txt --quick", guard=("afile.txt",)),
    # -- import / export of research-code checkpoints ---------------------------------------------------------------
    Case("i01", "import of a checkpoint file that does not exist", "import --from coop missing.pth.tar-50 "
         "--model embedded --dataset toy:shapes --output runs/i01"),
    Case("i02", "import of a folder that holds no checkpoint", "import --from coop notarun --model embedded "
         "--dataset toy:shapes --output runs/i02"),
    Case("i03", "import of a text file as a checkpoint", "import --from coop afile.txt --model embedded "
         "--dataset toy:shapes --output runs/i03", guard=("afile.txt",)),
    Case("i04", "import with the wrong --from (a CoOp file read as MaPLe)", "import --from maple "
         "released/prompt_learner/model.pth.tar-1 --model embedded --dataset toy:shapes --output runs/i04",
         guard=("released",), needs=("released",)),
    Case("i05", "import without class names", "import --from coop released/prompt_learner/model.pth.tar-1 "
         "--model embedded --output runs/i05", needs=("released",)),
    Case("i06", "import into a finished run folder", "import --from coop released/prompt_learner/model.pth.tar-1 "
         "--model embedded --dataset toy:shapes --output runs/base", guard=("runs/base",), needs=("released",)),
    Case("i07", "import onto a CLIP of another width", "import --from coop released/prompt_learner/model.pth.tar-1 "
         "--model random:vit-b-16 --dataset toy:shapes --output runs/i07", needs=("released",)),
    Case("i08", "import with a method option the file fixes", "import --from coop "
         "released/prompt_learner/model.pth.tar-1 --model embedded --dataset toy:shapes --output runs/i08 "
         "--set method.n_ctx=8", needs=("released",)),
    Case("i09", "import as a user would (the checkpoint of a CoOp run)", "import --from coop "
         "released/prompt_learner/model.pth.tar-1 --model embedded --dataset toy:shapes --output runs/i09",
         expect="ok", needs=("released",)),
    Case("i10", "export over an existing file", "export runs/base --to coop --output afile.txt",
         guard=("afile.txt", "runs/base"), needs=("base",)),
    Case("i11", "export of a CoOp run as MaPLe", "export runs/base --to maple --output released/maple.pth.tar-1",
         guard=("runs/base",), needs=("base",)),
    Case("i12", "export of a folder that is no run", "export notarun --to coop --output released/x.pth.tar-1"),
    # -- the current methods' options ------------------------------------------------------------------------------
    Case("n01", "CLIP-LoRA with dropout 1", f"train --method clip_lora {TINY} --output runs/n01 "
         "--set method.dropout=1.0"),
    Case("n02", "PromptSRC with an unknown template ensemble", f"train --method promptsrc {TINY} --output runs/n02 "
         "--set method.text_templates=coco"),
    Case("n03", "CLIP-LoRA adapting an unknown projection", f"train --method clip_lora {TINY} --output runs/n03 "
         "--set 'method.projections=[q, x]'"),
    Case("n04", "params of Tip-Adapter-F at 0 shots", "params --model random:tiny --methods tip_adapter_f --shots 0"),
    # -- recipes ----------------------------------------------------------------------------------------------------
    Case("r02", "a recipe file that does not exist", f"{TRAIN} --recipe missing.yaml --output runs/r02"),
    Case("r10", "a folder as the recipe", f"{TRAIN} --recipe rec --output runs/r10"),
    Case("r04", "a recipe file that is not valid YAML", f"{TRAIN} --recipe cfg/bad.yaml --output runs/r04"),
    Case("r06", "a recipe file for an unknown method", f"{TRAIN} --recipe rec/unk_method.yaml --output runs/r06"),
    Case("r05", "a typo in a recipe's train option", f"{TRAIN} --recipe rec/unk_train.yaml --output runs/r05"),
    Case("r07", "a word where a number belongs in a recipe", f"{TRAIN} --recipe rec/bad_lr.yaml --output runs/r07"),
    Case("r08", "a recipe written as YAML in a .txt file", f"{TRAIN} --recipe rec/plain.txt --output runs/r08"),
]


# ------------------------------------------------------------------------------------------------------- fixtures
FIXTURES: dict[str, tuple[tuple[str, ...], Callable[[Path], None]]] = {}


def fixture(*deps: str):
    def register(build: Callable[[Path], None]):
        FIXTURES[build.__name__] = (deps, build)
        return build
    return register


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VLPROMPT_DEBUG", None)  # errors as one line, as a user sees them
    return env


def setup_cli(root: Path, command: str) -> None:
    """Run a vlprompt command that builds an input; stop the tour if it fails."""
    done = subprocess.run([str(VLPROMPT), *shlex.split(command)], cwd=root, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=cli_env(), timeout=SETUP_TIMEOUT_S)
    if done.returncode != 0:
        sys.exit(f"fault_tour: setup command `vlprompt {command}` failed ({done.returncode}):\n{done.stderr[-3000:]}")


def write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


def draw(path: Path, shape: str, index: int) -> None:
    """A 48x48 image of a filled circle, square or star, its place and colours varying with index."""
    from PIL import Image, ImageDraw

    backgrounds = [(250, 250, 250), (225, 235, 245), (245, 235, 220), (230, 245, 230)]
    inks = [(200, 40, 40), (40, 90, 200), (30, 140, 60), (120, 60, 160)]
    image = Image.new("RGB", (48, 48), backgrounds[index % len(backgrounds)])
    pen = ImageDraw.Draw(image)
    x, y, size = 4 + (index * 5) % 14, 4 + (index * 3) % 14, 26
    ink = inks[index % len(inks)]
    if shape == "circle":
        pen.ellipse((x, y, x + size, y + size), fill=ink)
    elif shape == "square":
        pen.rectangle((x, y, x + size, y + size), fill=ink)
    else:
        import math

        cx, cy, points = x + size / 2, y + size / 2, []
        for k in range(10):
            radius = size / 2 if k % 2 == 0 else size / 5
            angle = math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy - radius * math.sin(angle)))
        pen.polygon(points, fill=ink)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


CLASSES = ("circle", "square", "star")


def image_folder(root: Path, splits: tuple[str, ...] = ("train", "test"), classes: tuple[str, ...] = CLASSES,
                 per_class: int = 6) -> Path:
    """<root>/<split>/<class>/NNNN.png for each split (or <root>/<class>/NNNN.png when splits is empty)."""
    for split in splits or ("",):
        for c, name in enumerate(classes):
            for i in range(per_class):
                draw(root / split / name / f"{i:04d}.png", name, 7 * c + i + (50 if split == "test" else 0))
    return root


@fixture()
def files(root: Path) -> None:
    """Small inputs: a file the user keeps, a folder that is no run, images, config/recipe files, a non-COCO file."""
    write(root / "afile.txt", "my notes: keep this file\n")
    (root / "notarun").mkdir(exist_ok=True)
    (root / "bench" / "empty").mkdir(parents=True, exist_ok=True)
    draw(root / "imgs" / "good.png", "star", 0)
    write(root / "imgs" / "x.png", "hello\n")  # a text file named like an image
    write(root / "imgs" / "empty.png", b"")
    configs = {
        "bad.yaml": "model: [unclosed\n",
        "list.yaml": "- a\n- b\n",
        "unknown.yaml": "method: coop\nepochs: 1\n",
        "datastr.yaml": "data: toy:shapes\n",
        "datastr3.yaml": "data: toy:colours\n",
        "modellist.yaml": "model: [a, b]\n",
        "datakey.yaml": "data:\n  dataset: toy:shapes\n  shot: 2\n",
        "bench_unk.yaml": "methods: [zeroshot]\ndatasets: [toy:shapes]\nshots: [1]\nseeds: [1]\nepochs: 1\n",
    }
    for name, text in configs.items():
        write(root / "cfg" / name, text)
    recipes = {
        "unk_method.yaml": "methods:\n  copo:\n    train:\n      lr: 0.5\n",
        "unk_train.yaml": "train:\n  lrr: 0.1\n",
        "bad_lr.yaml": "methods:\n  coop:\n    train:\n      lr: abc\n",
        "plain.txt": "train:\n  epochs: 1\n",
    }
    for name, text in recipes.items():
        write(root / "rec" / name, text)


@fixture()
def folders(root: Path) -> None:
    """Image folders, a good one in each layout and one per broken layout."""
    image_folder(root / "img_flat", splits=())
    image_folder(root / "img_split")
    empty_class = image_folder(root / "img_emptyclass")
    shutil.rmtree(empty_class / "train" / "star")
    (empty_class / "train" / "star").mkdir()
    extra_class = image_folder(root / "img_extraclass")
    shutil.rmtree(extra_class / "train" / "star")
    file_class = image_folder(root / "img_fileclass")
    shutil.rmtree(file_class / "train" / "star")
    write(file_class / "train" / "star", "star images go here\n")
    image_folder(root / "img_oneclass", classes=("circle",))
    image_folder(root / "img_onlytrain", splits=("train",))
    image_folder(root / "img_notrain", splits=("test",))
    corrupt = image_folder(root / "img_corrupt")
    write(corrupt / "train" / "circle" / "0000.png", "not an image\n")


@fixture()
def models(root: Path) -> None:
    """fm4: a copy of the embedded toy CLIP's folder whose vlprompt_recipe.json is cut."""
    spec = importlib.util.find_spec("vlprompt")
    toyclip = Path(next(iter(spec.submodule_search_locations))) / "assets" / "toyclip"
    shutil.copytree(toyclip, root / "fm4", dirs_exist_ok=True)
    write(root / "fm4" / "vlprompt_recipe.json", "{bad\n")


@fixture("files")
def base(root: Path) -> None:
    """runs/base: a finished CoOp run (toy:shapes, 2 shots, 1 epoch)."""
    setup_cli(root, BASE)


@fixture("base")
def released(root: Path) -> None:
    """released/prompt_learner/model.pth.tar-1: runs/base written as CoOp's trainer saves its prompt learner."""
    setup_cli(root, "export runs/base --to coop --output released/prompt_learner/model.pth.tar-1 --epoch 1")


@fixture("base")
def half(root: Path) -> None:
    """Copies of runs/base with prompt.safetensors missing (half1) or empty (half2)."""
    for name in ("half1", "half2"):
        shutil.rmtree(root / "runs" / name, ignore_errors=True)
        shutil.copytree(root / "runs" / "base", root / "runs" / name)
    (root / "runs" / "half1" / "prompt.safetensors").unlink()
    (root / "runs" / "half2" / "prompt.safetensors").write_bytes(b"")


@fixture("files")
def interrupted(root: Path) -> None:
    """runs/interrupted: a 50-epoch run killed once it saved epoch 2 or later (like a crash or a lost session);
    runs/intr_fewer is a copy, runs/intr_corrupt a copy whose checkpoint-last/state.json is cut."""
    run = root / "runs" / "interrupted"
    state = run / "checkpoint-last" / "state.json"
    process = subprocess.Popen([str(VLPROMPT), *shlex.split(f"{INTR} --output runs/interrupted")], cwd=root,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=cli_env())
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if json.loads(state.read_text())["epochs_done"] >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        finished = process.poll() is not None
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        _, err = process.communicate()
    if finished or not state.exists():
        sys.exit(f"fault_tour: could not interrupt `vlprompt {INTR} --output runs/interrupted` after epoch 2 "
                 f"(finished: {finished}):\n{err.decode()[-3000:]}")
    for name in ("intr_fewer", "intr_corrupt"):
        shutil.rmtree(root / "runs" / name, ignore_errors=True)
        shutil.copytree(run, root / "runs" / name)
    (root / "runs" / "intr_corrupt" / "checkpoint-last" / "state.json").write_text("{bad\n")


@fixture("base")
def mydir(root: Path) -> None:
    """mydir: a copy of runs/base in which the user also keeps notes (important.txt, sub/notes.txt)."""
    shutil.rmtree(root / "mydir", ignore_errors=True)
    shutil.copytree(root / "runs" / "base", root / "mydir")
    write(root / "mydir" / "important.txt", "results I wrote down by hand\n")
    write(root / "mydir" / "sub" / "notes.txt", "more notes\n")


@fixture("files")
def moved(root: Path) -> None:
    """runs/moved: a finished run on imagefolder:img_moved, whose folder was then renamed img_moved_elsewhere."""
    shutil.rmtree(root / "img_moved_elsewhere", ignore_errors=True)
    image_folder(root / "img_moved")
    setup_cli(root, f"{TRAIN} --dataset imagefolder:img_moved --output runs/moved")
    (root / "img_moved").rename(root / "img_moved_elsewhere")


@fixture("files")
def bench(root: Path) -> None:
    """bench/done: a finished CoOp bench (1 shot, 1 seed, 1 epoch); bench/nocsv: a copy without results.csv;
    bench/report: a copy for --report-only to rewrite."""
    setup_cli(root, f"{BENCH} --set default_train.epochs=1 --output bench/done")
    for name in ("nocsv", "report"):
        shutil.rmtree(root / "bench" / name, ignore_errors=True)
        shutil.copytree(root / "bench" / "done", root / "bench" / name)
    (root / "bench" / "nocsv" / "results.csv").unlink()


def build(root: Path, name: str, built: set[str]) -> None:
    if name in built:
        return
    deps, make = FIXTURES[name]
    for dep in deps:
        build(root, dep, built)
    start = time.monotonic()
    make(root)
    built.add(name)
    print(f"fault_tour: built {name} ({time.monotonic() - start:.1f} s)", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ running
def digest(root: Path, paths: tuple[str, ...]) -> dict[str, str]:
    """relative path -> sha256 of every file under the guarded paths ("absent" for a guarded path that is not there)."""
    found = {}
    for guarded in paths:
        target = root / guarded
        if target.is_dir():
            files = sorted(p for p in target.rglob("*") if p.is_file())
        elif target.is_file():
            files = [target]
        else:
            found[guarded] = "absent"
            continue
        for file in files:
            if file.name == LOCK_FILE:
                continue
            found[str(file.relative_to(root))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def stderr_lines(text: str) -> list[str]:
    """Non-empty stderr lines, progress bars dropped."""
    lines = re.split(r"[\r\n]+", text)
    return [line.rstrip() for line in lines if line.strip() and not PROGRESS_BAR.search(line)]


def message_of(lines: list[str]) -> tuple[str, int]:
    """The first line starting with 'vlprompt ' (else the last line) and its index (-1 when there is none)."""
    for i, line in enumerate(lines):
        if line.startswith("vlprompt "):
            return line, i
    return (lines[-1], len(lines) - 1) if lines else ("", -1)


def judge(case: Case, code: int | None, lines: list[str], message: str, at: int, changed: list[str]) -> str:
    problems = []
    traceback = any(line.startswith("Traceback (most recent call last)") for line in lines)
    if code is None:
        problems.append(f"TIMED OUT after {CASE_TIMEOUT_S} s")
    elif traceback:
        problems.append(f"TRACEBACK (exit {code})")
    elif case.expect == "error":
        if code == 0:
            problems.append("EXIT 0")
        elif code != 2:
            problems.append(f"EXIT {code}")
        elif not message.startswith(f"vlprompt {case.subcommand}: error:"):
            problems.append("NO `vlprompt ...: error:` LINE")
        elif len(lines) - at - 1 > 0:
            problems.append(f"MESSAGE OF {len(lines) - at} LINES")
    else:
        if code != 0:
            problems.append(f"EXIT {code}")
        elif case.expect == "warning" and not any(line.startswith(f"vlprompt {case.subcommand}: warning:")
                                                  for line in lines):
            problems.append("NO WARNING")
    if changed:
        problems.append("FILES CHANGED")
    if not problems:
        return f"as expected ({case.expect})"
    return f"**{', '.join(problems)}** (expected {case.expect})"


@dataclass
class Row:
    case: Case
    code: int | None
    message: str
    files: str
    verdict: str
    seconds: float

    @property
    def unexpected(self) -> bool:
        return not self.verdict.startswith("as expected")


def run_case(root: Path, case: Case) -> Row:
    before = digest(root, case.guard)
    start = time.monotonic()
    try:
        done = subprocess.run([str(VLPROMPT), *case.argv], cwd=root, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, env=cli_env(), timeout=CASE_TIMEOUT_S)
        code, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as timeout:
        code = None
        out = timeout.stdout.decode() if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
        err = timeout.stderr.decode() if isinstance(timeout.stderr, bytes) else (timeout.stderr or "")
    seconds = time.monotonic() - start
    write(root / "out" / f"{case.id}.out", out)
    write(root / "out" / f"{case.id}.err", err)
    after = digest(root, case.guard)
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    if not case.guard:
        files = ""
    elif changed:
        files = "CHANGED: " + ", ".join(changed[:4]) + (f" (+{len(changed) - 4})" if len(changed) > 4 else "")
    else:
        files = "kept"
    lines = stderr_lines(err)
    message, at = message_of(lines)
    return Row(case, code, message, files, judge(case, code, lines, message, at, changed), seconds)


# ------------------------------------------------------------------------------------------------------- report
def cell(text: str) -> str:
    return text.replace("|", "\\|")


def code_cell(text: str) -> str:
    """A code span (so <path> and * show as written), with | escaped for the table."""
    if not text:
        return ""
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return cell(f"{fence}{pad}{text}{pad}{fence}")


def table(rows: list[Row]) -> str:
    out = ["| id | fault | command | exit | message | files | verdict |", "|---|---|---|---:|---|---|---|"]
    for row in rows:
        exit_code = "timeout" if row.code is None else str(row.code)
        out.append(f"| {row.case.id} | {cell(row.case.fault)} | {code_cell('vlprompt ' + row.case.command)} | "
                   f"{exit_code} | {code_cell(row.message)} | {cell(row.files)} | {cell(row.verdict)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path,
                        help="scratch folder to create (the inputs, each case's output, fault_tour.md)")
    parser.add_argument("--only", default="", metavar="PREFIX", help="run only the cases whose id starts with PREFIX")
    args = parser.parse_args(argv)

    cases = [case for case in CASES if case.id.startswith(args.only)]
    if not cases:
        parser.error(f"no case id starts with {args.only!r}; ids: {', '.join(case.id for case in CASES)}")
    if len({case.id for case in CASES}) != len(CASES):
        parser.error("duplicate case ids")
    if not VLPROMPT.exists():
        parser.error(f"no vlprompt executable next to {sys.executable}")
    root = args.output.resolve()
    if root.exists() and any(root.iterdir()):
        parser.error(f"--output {args.output} exists and is not empty: give a new scratch folder")
    root.mkdir(parents=True, exist_ok=True)

    start = time.monotonic()
    built: set[str] = set()
    build(root, "files", built)
    for case in cases:
        for name in case.needs:
            build(root, name, built)
    setup_s = time.monotonic() - start

    rows = []
    for i, case in enumerate(cases, 1):
        row = run_case(root, case)
        rows.append(row)
        print(f"fault_tour: [{i}/{len(cases)}] {case.id} exit {row.code} ({row.seconds:.1f} s) {row.verdict}",
              file=sys.stderr, flush=True)
    total_s = time.monotonic() - start

    unexpected = [row for row in rows if row.unexpected]
    summary = (f"{len(rows)} cases, {len(unexpected)} not as expected"
               + (f" ({', '.join(row.case.id for row in unexpected)})" if unexpected else "")
               + f"; {total_s:.0f} s in all ({setup_s:.0f} s building the inputs).")
    report = table(rows) + "\n\n" + summary + "\n"
    print(report, end="")
    write(root / "fault_tour.md", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
