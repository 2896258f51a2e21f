"""An example dataset folder from the real photographs scikit-image ships (for demos and tests).

    python -m difftrain_dist.data_shards.examples OUT_DIR

writes OUT_DIR/<name>.<ext> with a same-stem `.txt` caption per image (the ai-toolkit layout).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

CAPTIONS = {
    "astronaut.png": "a portrait photo of an astronaut in a white spacesuit in front of an american flag",
    "coffee.png": "a photo of a cup of coffee on a saucer with a spoon",
    "chelsea.png": "a photo of a tabby cat looking to the side",
    "rocket.jpg": "a photo of a rocket on the launch pad under a blue sky",
    "motorcycle_left.png": "a photo of a red motorcycle in a garage",
    "hubble_deep_field.jpg": "a telescope photo of distant galaxies in the deep field",
    "retina.jpg": "a medical photo of the retina of a human eye",
    "camera.png": "a black and white photo of a cameraman with a tripod",
    "coins.png": "a black and white photo of old coins on a table",
    "moon.png": "a black and white photo of the surface of the moon",
    "brick.png": "a black and white photo of a brick wall",
    "grass.png": "a black and white photo of grass",
    "gravel.png": "a black and white photo of gravel",
    "page.png": "a scan of a printed page of text",
    "text.png": "a photo of painted text on a wall",
    "horse.png": "a black silhouette of a horse",
    "logo.png": "the scikit-image logo, a snake drawn over an image of a microscope slide",
    "ihc.png": "a microscope photo of a stained tissue sample",
    "cell.png": "a microscope photo of a cell",
    "color.png": "a photo of colored plastic pieces",
    "clock_motion.png": "a black and white photo of a clock with motion blur",
}


def write_example_folder(out: Path) -> list[Path]:
    """Copy the scikit-image photographs listed in CAPTIONS into `out` with caption files.

    Returns the image paths written. Raises ValueError when scikit-image is not installed.
    """
    try:
        from skimage import data
    except ImportError as err:
        raise ValueError("the example folder needs scikit-image: pip install scikit-image") from err
    src = Path(data.data_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, caption in CAPTIONS.items():
        if not (src / name).is_file():
            continue
        shutil.copyfile(src / name, out / name)
        (out / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        written.append(out / name)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m difftrain_dist.data_shards.examples OUT_DIR")
    paths = write_example_folder(Path(sys.argv[1]))
    print(f"{len(paths)} photographs with captions in {sys.argv[1]}")
