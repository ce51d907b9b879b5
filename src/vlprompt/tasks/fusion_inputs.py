"""What the VQA, NLVR2 and retrieval tasks share: the dataset folder, the image transform (the model's square input
and its own normalisation, no augmentation) and token ids with their padding mask."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from vlprompt.data import DatasetError, ImageTransformConfig, build_transform

def dataset_folder(dataset: str, root: str | None, form: str) -> Path:
    """The folder of ``<scheme>:<folder>`` (a relative folder is read under ``root`` when it is not found as
    written), or of a toy set ``toy:<task>`` (generated on first use under ``root``, default the toy cache folder);
    ``form`` is what the error asks for."""
    from vlprompt.specs import DatasetSpec

    spec = DatasetSpec.parse(dataset)
    if spec.scheme == "toy":
        from vlprompt.toyworld.fusion_sets import materialize_fusion_set
        from vlprompt.toyworld.suite import default_toy_root

        return materialize_fusion_set(spec.name.lower(), Path(root).expanduser() if root else default_toy_root())
    folder = Path(dataset.split(":", 1)[1]).expanduser()
    if not folder.is_dir() and root and (Path(root) / folder).is_dir():
        folder = Path(root) / folder
    if not folder.is_dir():
        raise DatasetError(f"{dataset}: {folder} is not a folder; pass {form}")
    return folder


def refuse_shots(data, task: str, why: str) -> None:
    if data.shots is not None:
        raise DatasetError(f"--shots samples training images per class, and {task} has no classes to sample "
                           f"({why}): train on the whole split (leave --shots out)")  # fmt: skip


def fusion_transform(backbone) -> Callable:
    return build_transform(ImageTransformConfig(size=backbone.image_size, mean=backbone.image_mean,
                                                std=backbone.image_std), train=False)


def tokens_and_mask(backbone, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(N, T)`` of ``texts`` and their padding mask (1 = a token)."""
    if not texts:
        return torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)
    tokens = backbone.tokenize(list(texts))
    positions = torch.arange(tokens.input_ids.shape[1])
    return tokens.input_ids, (positions < tokens.lengths.unsqueeze(1)).long()
