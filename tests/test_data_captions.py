"""Caption transforms: trigger placeholders, dropout, tag shuffling with keep_tokens, trigger word;
deterministic in (seed, epoch, key) so that resumed streams match; and their recipe fields."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from difftrain_dist.config import DataSection
from difftrain_dist.data_shards import CaptionTransform
from difftrain_dist.data_shards.captions import fill_placeholders

from .shard_sources import EMPTY_INDEX

TAGS = "ohwx, a cat, sitting, on a sofa, red, indoors, photo"


def test_placeholders_are_filled_or_removed():
    assert fill_placeholders("[trigger], a cat, [name] again", "ohwx") == "ohwx, a cat, ohwx again"
    assert fill_placeholders("[trigger], a cat", None) == "a cat"
    assert fill_placeholders("a photo of [trigger] , smiling", None) == "a photo of, smiling"
    assert fill_placeholders("no placeholder", None) == "no placeholder"


def test_transform_is_deterministic_per_seed_epoch_and_key():
    t = CaptionTransform(dropout=0.1, shuffle=True, keep_tokens=1)
    first = [t(TAGS, seed=3, epoch=e, key=f"k{i}") for e in range(3) for i in range(50)]
    again = [t(TAGS, seed=3, epoch=e, key=f"k{i}") for e in range(3) for i in range(50)]
    other_seed = [t(TAGS, seed=4, epoch=e, key=f"k{i}") for e in range(3) for i in range(50)]
    assert first == again and first != other_seed
    epochs = [t(TAGS, seed=3, epoch=e, key="k0") for e in range(20)]
    assert len(set(epochs)) > 5  # a sample gets other captions in other epochs


def test_shuffle_keeps_the_first_tokens_and_the_tags():
    t = CaptionTransform(shuffle=True, keep_tokens=2)
    outs = {t(TAGS, seed=0, epoch=0, key=f"k{i}") for i in range(40)}
    assert len(outs) > 10
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["ohwx", "a cat"] and sorted(tags) == sorted(TAGS.split(", "))


def test_dropout_rate_and_extremes():
    t = CaptionTransform(dropout=0.3)
    dropped = sum(t(TAGS, seed=1, epoch=0, key=str(i)) == "" for i in range(4000)) / 4000
    assert 0.27 < dropped < 0.33
    assert {CaptionTransform(dropout=1.0)(TAGS, seed=1, epoch=0, key=str(i)) for i in range(50)} == {""}
    assert CaptionTransform()(TAGS, seed=1, epoch=0, key="k") == TAGS  # identity by default


def test_trigger_word_is_prepended_when_absent():
    t = CaptionTransform(trigger_word="sks")
    assert t("a photo of a dog", seed=0, epoch=0, key="k") == "sks a photo of a dog"
    assert t("a photo of sks dog", seed=0, epoch=0, key="k") == "a photo of sks dog"
    assert t("[trigger] dog", seed=0, epoch=0, key="k") == "sks dog"
    assert t("", seed=0, epoch=0, key="k") == "sks"
    shuffled = CaptionTransform(trigger_word="sks", shuffle=True)
    assert all(shuffled("a, b, c, d", seed=0, epoch=0, key=str(i)).startswith("sks ") for i in range(20))


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="caption_dropout"):
        CaptionTransform(dropout=1.5)
    with pytest.raises(ValueError, match="keep_tokens"):
        CaptionTransform(keep_tokens=-1)
    (tmp_path / "index.json").write_text(EMPTY_INDEX)
    section = DataSection(shards=tmp_path, resolution=64, caption_dropout=0.1, shuffle_captions=True, keep_tokens=1,
                          trigger_word="sks")
    assert (section.caption_dropout, section.keep_tokens, section.trigger_word) == (0.1, 1, "sks")
    assert DataSection(shards=tmp_path, resolution=64).caption_dropout == 0.0
    with pytest.raises(ValidationError, match="caption_dropout"):
        DataSection(shards=tmp_path, resolution=64, caption_dropout=1.5)
    with pytest.raises(ValidationError, match="keep_tokens"):
        DataSection(shards=tmp_path, resolution=64, keep_tokens=-1)
