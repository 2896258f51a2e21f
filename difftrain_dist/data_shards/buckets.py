"""Aspect-ratio buckets: the (width, height) sizes, in px, that images are resized and cropped to.

For a training resolution R the candidate buckets are the sizes (w, h) such that

- w and h are multiples of the bucket step (`bucket_step`, 64 by default, capped at R so tiny test
  resolutions keep their square bucket);
- MIN_BUCKET_AREA * R² <= w * h <= R² (at most the pixels of the R x R square, and at least 3/4 of
  them: without the lower bound the closest-aspect rule below picks tiny buckets such as 256x320 at
  R = 512, only 31% of the pixels, because a small bucket often has a marginally closer aspect);
- max(w / h, h / w) <= `max_aspect` (4.0: from 1:4 to 4:1; 1.0 gives square crops only).

An image of size (W, H) gets the candidate whose aspect ratio is closest to W / H in log space
(|log(w / h) - log(W / H)|), ties going to the larger area, then to the larger width. It is then
scaled to cover the bucket and centre-cropped (`images.fit_to_bucket`). This follows ai-toolkit's
bucketing (ostris/ai-toolkit, toolkit/buckets.py) with buckets generated from the step instead of a
fixed SDXL list.

A bucket is named "WxH" in index.json and stored as [w, h] in each sample's KEY.json.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

Bucket = tuple[int, int]  # (width, height), px

DEFAULT_BUCKET_STEP = 64
DEFAULT_MAX_ASPECT = 4.0
MIN_BUCKET_AREA = 0.75
"""Smallest bucket area, as a fraction of resolution²."""


def bucket_name(bucket: Bucket) -> str:
    """"WxH" for (w, h)."""
    return f"{bucket[0]}x{bucket[1]}"


def parse_bucket(name: str) -> Bucket:
    """(w, h) from "WxH".

    Raises:
        ValueError: `name` is not two positive integers joined by "x".
    """
    width, sep, height = name.partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise ValueError(f"bucket {name!r}: expected 'WIDTHxHEIGHT' in px, e.g. '576x384'")
    return int(width), int(height)


def check_bucket_args(resolutions: Sequence[int], bucket_step: int, max_aspect: float) -> None:
    """Validate bucketing arguments.

    Raises:
        ValueError: naming `resolution`, `bucket_step` or `max_aspect`: an empty list, a
            resolution that is not a positive multiple of the (capped) step, a step < 1, or
            max_aspect < 1.
    """
    if not isinstance(bucket_step, int) or isinstance(bucket_step, bool) or bucket_step < 1:
        raise ValueError(f"bucket_step: expected a positive int (px), found {bucket_step!r}")
    if not isinstance(max_aspect, (int, float)) or not max_aspect >= 1.0:
        raise ValueError(f"max_aspect: expected a number >= 1 (long side / short side), found {max_aspect!r}")
    if not resolutions:
        raise ValueError("resolution: expected at least one resolution (px)")
    for res in resolutions:
        if not isinstance(res, int) or isinstance(res, bool) or res < 1:
            raise ValueError(f"resolution: expected a positive int (px), found {res!r}")
        step = min(bucket_step, res)
        if res % step:
            raise ValueError(f"resolution: {res} px is not a multiple of bucket_step {bucket_step} px")
    if len(set(resolutions)) != len(resolutions):
        raise ValueError(f"resolution: {list(resolutions)} lists a resolution twice")


@lru_cache(maxsize=64)
def candidate_buckets(resolution: int, bucket_step: int = DEFAULT_BUCKET_STEP,
                      max_aspect: float = DEFAULT_MAX_ASPECT) -> tuple[Bucket, ...]:
    """The candidate buckets for `resolution` (px), sorted by (width, height).

    Of several candidates with exactly the same aspect ratio only the largest is listed (the
    others could never be chosen). The square (R, R) is always one of them.
    Raises ValueError for bad arguments (see `check_bucket_args`).
    """
    check_bucket_args([resolution], bucket_step, max_aspect)
    step = min(bucket_step, resolution)
    most = resolution * resolution
    least = MIN_BUCKET_AREA * most
    largest: dict[tuple[int, int], Bucket] = {}  # per exact aspect ratio, the largest bucket
    for width in range(step, most // step + 1, step):
        for height in range(step, most // width + 1, step):
            if width * height >= least and max(width / height, height / width) <= max_aspect + 1e-9:
                g = math.gcd(width, height)
                largest[(width // g, height // g)] = (width, height)  # widths ascend: the last is largest
    return tuple(sorted(largest.values()))


def choose_bucket(width: int, height: int, candidates: Sequence[Bucket]) -> Bucket:
    """The candidate whose aspect ratio is closest to width / height (ties: larger area, then wider).

    Raises:
        ValueError: width or height < 1, or no candidates.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height}: expected positive px")
    if not candidates:
        raise ValueError("no candidate buckets")
    target = math.log(width / height)
    return min(candidates, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1], -b[0]))
