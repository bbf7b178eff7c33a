"""ImageNet-style folders: root/train/<class>/*.JPEG and root/val/<class>/*.JPEG (torchvision's ImageFolder)."""
from __future__ import annotations

import os

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.datasets import ImageFolder

from kdcore.errors import UserError

from .registry import register_dataset


def load_image_file(path: str) -> Image.Image:
    """ImageFolder's loader, with an unreadable image reported as a user error naming its path."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises these for truncated or corrupt files
        raise UserError(f"cannot read image {path!r} ({type(exc).__name__}: {exc}); replace or delete that file "
                        f"(ImageNet's train set holds a few such files: re-encode them as JPEG)") from None


def is_image_folder_tree(root: str) -> bool:
    return os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val"))


# No class names: the folders are named by ids (n01440764, ...), which CLIP prompts cannot use.
@register_dataset("imagenet", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, detect=is_image_folder_tree,
                  layout="an ImageNet-style tree (train/ and val/ class folders)")
def read_image_folder(root: str, split: str, args=None) -> ImageFolder:
    """root/<split>/ as an ImageFolder whose classes are the sorted folder names."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UserError(f"ImageNet-style dataset {root!r} has no {split}/ folder; expected {root}/train/<class>/"
                        f"*.JPEG and {root}/val/<class>/*.JPEG")
    try:
        dataset = ImageFolder(folder, loader=load_image_file)
    except FileNotFoundError as exc:  # torchvision: a class folder without any image file
        raise UserError(f"ImageNet-style dataset {root!r}, {split}/: {exc}; add images to those class folders or "
                        f"remove them") from None
    dataset.num_classes = len(dataset.classes)
    dataset.source = root
    return dataset
