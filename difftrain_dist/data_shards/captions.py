"""Caption handling: trigger-word placeholders (build time) and per-epoch transforms (read time).

Both follow ai-toolkit (ostris/ai-toolkit, toolkit/prompt_utils.py `inject_trigger_into_prompt`
and the caption mixin): `[trigger]` and `[name]` stand for the trigger word; a trigger word that
is absent from a caption is prepended with a space; caption dropout yields the empty string;
shuffling works on comma-separated tags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .plan import epoch_rng

PLACEHOLDERS = ("[trigger]", "[name]")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_COMMA = re.compile(r"\s+,")
_EMPTY_TAGS = re.compile(r",(\s*,)+")


def fill_placeholders(caption: str, trigger_word: str | None) -> str:
    """Replace `[trigger]` / `[name]` by `trigger_word`, or remove them when it is None or "".

    Removing a placeholder also tidies what it leaves behind (doubled spaces, empty tags ", ,").
    """
    if not any(p in caption for p in PLACEHOLDERS):
        return caption
    for placeholder in PLACEHOLDERS:
        caption = caption.replace(placeholder, trigger_word or "")
    if not trigger_word:
        caption = _SPACE_BEFORE_COMMA.sub(",", _SPACES.sub(" ", caption))
        caption = _EMPTY_TAGS.sub(",", caption).strip(" ,")
    return caption


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [t.strip() for t in caption.split(",") if t.strip()]


@dataclass(frozen=True)
class CaptionTransform:
    """The read-time caption pipeline, deterministic in (seed, epoch, sample key).

    Steps, in order: dropout (probability `dropout` of returning ""), placeholders
    (`fill_placeholders` with `trigger_word`), tag shuffle (when `shuffle`: the tags after the
    first `keep_tokens` are shuffled and re-joined with ", "), trigger (when `trigger_word` is set
    and not already in the caption, it is prepended followed by a space).

    Raises (on construction):
        ValueError: dropout outside [0, 1] or keep_tokens < 0, naming the field.
    """

    dropout: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0
    trigger_word: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"caption_dropout: expected a probability in [0, 1], found {self.dropout!r}")
        if not isinstance(self.keep_tokens, int) or self.keep_tokens < 0:
            raise ValueError(f"keep_tokens: expected an int >= 0 (tags), found {self.keep_tokens!r}")

    @property
    def is_random(self) -> bool:
        """Whether the transform draws random numbers (dropout or shuffle)."""
        return self.dropout > 0 or self.shuffle

    def __call__(self, caption: str, *, seed: int, epoch: int, key: str) -> str:
        """The caption sample `key` gets in `epoch` of a stream seeded with `seed`."""
        rng = epoch_rng("caption", seed, epoch, key) if self.is_random else None
        if rng is not None and rng.random() < self.dropout:
            return ""
        caption = fill_placeholders(caption, self.trigger_word)
        if self.shuffle:
            tags = split_tags(caption)
            head, tail = tags[: self.keep_tokens], tags[self.keep_tokens:]
            rng.shuffle(tail)
            caption = ", ".join(head + tail)
        if self.trigger_word and self.trigger_word not in caption:
            caption = f"{self.trigger_word} {caption}".rstrip()
        return caption
