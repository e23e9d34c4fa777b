"""One image loader for every path: the same real-world files (EXIF-rotated JPEG, transparent PNGs,
16-bit grey, CMYK, 1-bit, animated GIF) give identical pixels through the processor, the training
collator (evaluation mode, the augmentation pipeline with every random step off, and its image
cache), evaluation's gallery encoding, the gallery index and the Space; broken files (a
decompression bomb, corrupt and truncated files) are refused naming the file by each of them."""

from __future__ import annotations

import io
import os
import types

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import ExifTags
from transformers import PretrainedConfig

from diana.training.data.collator import DiaNACollator
from diana.processing.image_loading import BACKGROUND, ImageInputError, load_rgb_image, load_rgb_pil
from diana.processing.search import GalleryIndex
from tests.helpers import TINY_IMAGE_SIZE, write_png_bomb

RED, BLUE = (220, 30, 40), (20, 40, 210)
GREY16 = (1000, 30000, 65535)  # 16-bit values; the loader must map v -> round(v / 257)


def _exif_rotated_jpeg(path):
    """A 60x30 (W x H) photo stored sideways, red on its left half, with EXIF orientation 6
    (the camera was turned: viewers rotate it 90 degrees clockwise to 30x60)."""
    pixels = np.zeros((30, 60, 3), np.uint8)
    pixels[:, :30], pixels[:, 30:] = RED, BLUE
    exif = PIL.Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    PIL.Image.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif)


def _transparent_files(folder):
    """RGBA, LA and P files whose left half is fully transparent with a black stored colour."""
    rgba = np.zeros((40, 20, 4), np.uint8)
    rgba[:, 10:] = (*RED, 255)
    rgba[:, 10:15, 3] = 128  # a half-transparent band too
    PIL.Image.fromarray(rgba).save(folder / "rgba.png")
    la = np.zeros((40, 20, 2), np.uint8)
    la[:, 10:] = (90, 255)
    PIL.Image.fromarray(la, "LA").save(folder / "la.png")
    palette = PIL.Image.new("P", (20, 40), 0)
    palette.putpalette([0, 0, 0, *RED] + [0] * (256 - 2) * 3)
    palette.paste(1, (10, 0, 20, 40))
    palette.save(folder / "palette.png", transparency=0)


def _other_modes(folder):
    PIL.Image.fromarray(np.array([GREY16 * 4] * 24, np.uint16)).save(folder / "grey16.png")  # (24, 12), I;16
    PIL.Image.new("CMYK", (20, 40), (0, 200, 200, 30)).save(folder / "cmyk.jpg", quality=95)
    PIL.Image.fromarray(np.indices((40, 20)).sum(axis=0) % 2 == 0).save(folder / "onebit.png")
    frames = [PIL.Image.new("RGB", (20, 40), colour) for colour in (RED, BLUE)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real_world")
    _exif_rotated_jpeg(folder / "exif6.jpg")
    _transparent_files(folder)
    _other_modes(folder)
    names = ["exif6.jpg", "rgba.png", "la.png", "palette.png", "grey16.png", "cmyk.jpg", "onebit.png", "animated.gif"]
    return [str(folder / name) for name in names]


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    write_png_bomb(folder / "bomb.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return [str(folder / name) for name in ("bomb.png", "corrupt.jpg", "truncated.jpg")]


class PixelEcho(torch.nn.Module):
    """Stands in for DiaNA: the 'embedding' of an image is its pixel tensor, flattened, so what a
    path fed the model can be read back from the embeddings it stored."""

    def __init__(self):
        super().__init__()
        height, width = TINY_IMAGE_SIZE
        self.config = PretrainedConfig(projection_dim=3 * height * width, num_attribute_queries=1)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def encode_images(self, pixel_values):
        return types.SimpleNamespace(image_embeds=pixel_values.flatten(1), image_attribute_embeds=None)


def _rows(paths):
    return [{"image": {"path": p, "bytes": None}, "dialogue": "A person.", "person_id": i} for i, p in enumerate(paths)]


def _collators(processor):
    off = {"flip_probability": 0.0, "padding": 0, "erasing_probability": 0.0}
    common = dict(round_retaining=False, token_masking=0.0)
    return {
        "collator (evaluation mode)": DiaNACollator(processor, train=False, image_augmentation=False, **common),
        "augmentation pipeline, random steps off": DiaNACollator(
            processor, train=True, image_augmentation=True, image_augmentation_kwargs=off, seed=0, **common),
        "augmentation image cache": DiaNACollator(
            processor, train=True, image_augmentation=True, image_augmentation_kwargs=off, seed=0, image_cache=True,
            **common),
    }


def _gallery_dataset(paths):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "file_path": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": paths, "file_path": paths}, features=features)


def _evaluation_pixels(processor, paths, **kwargs):
    from diana.training.evaluation import encode_gallery

    out = encode_gallery(PixelEcho(), processor, _gallery_dataset(paths), list(range(len(paths))), batch_size=3,
                         keep_attributes=False, **kwargs)
    return out["embeds"].view(len(paths), 3, *TINY_IMAGE_SIZE), out["loaded"]


# ---------------------------------------------------------------- the semantics, on the loader itself


def test_loader_semantics_on_real_world_files(files):
    exif6, rgba, la, palette, grey16, cmyk, onebit, animated = (load_rgb_image(p) for p in files)
    # EXIF 6: the stored 60x30 picture is shown upright as 30x60, its left (red) half on top.
    assert exif6.shape == (60, 30, 3)
    assert np.abs(exif6[5, 15].astype(int) - RED).max() < 12 and np.abs(exif6[-5, 15].astype(int) - BLUE).max() < 12
    # Transparency on white, the documented background; opaque pixels untouched; alpha 128 blended.
    for image in (rgba, la, palette):
        assert (image[:, :10] == BACKGROUND).all()
    assert (rgba[:, 15:] == RED).all() and (la[:, 15:] == 90).all() and (palette[:, 10:] == RED).all()
    assert tuple(rgba[0, 12]) == tuple(round(c * 128 / 255 + 255 * 127 / 255) for c in RED)
    # 16-bit grey scaled by 255/65535, not clipped at 255.
    assert [int(grey16[0, i, 0]) for i in range(3)] == [round(v / 257) for v in GREY16] == [4, 117, 255]
    assert cmyk.shape == (40, 20, 3) and abs(int(cmyk[20, 10, 0]) - 225) <= 3 and cmyk[20, 10, 1] < 60
    assert set(np.unique(onebit).tolist()) == {0, 255} and onebit[0, 0, 0] == 255 and onebit[0, 1, 0] == 0
    assert (animated == RED).all()  # the first frame
    # In-memory inputs give the same pixels as the files they came from.
    with PIL.Image.open(files[0]) as opened:
        assert np.array_equal(load_rgb_image(opened), exif6)
    assert np.array_equal(load_rgb_image({"bytes": open(files[1], "rb").read(), "path": None}), rgba)
    assert np.array_equal(load_rgb_image(np.asarray(PIL.Image.open(files[4]))), grey16)
    assert np.array_equal(load_rgb_image(torch.from_numpy(rgba).permute(2, 0, 1)), rgba)


def test_bad_inputs_are_refused_naming_the_file_or_index(tiny_processor, broken, files, monkeypatch):
    bomb, corrupt, truncated = broken
    for path, message in [(bomb, "decompression bomb"), (corrupt, "could not be opened"), (truncated, "truncated")]:
        with pytest.raises(ImageInputError, match=rf"image 3 \({path}, row x\).*{message}"):
            load_rgb_image(path, 3, where="row x")
    with pytest.raises(ImageInputError, match=r"image 2: unsupported array dtype object"):
        load_rgb_image(np.array([[1, None]], dtype=object), 2)
    ragged = np.empty(2, dtype=object)  # a batch of differently sized images held in one object array
    ragged[0], ragged[1] = np.zeros((4, 2, 3), np.uint8), np.array([[1, None]], dtype=object)
    with pytest.raises(ImageInputError, match=r"image 1: unsupported array dtype object"):
        tiny_processor(images=ragged)
    with pytest.raises(ImageInputError, match=r"image 0.*missing \(None\)"):
        load_rgb_image(None, 0)
    # PIL only warns between MAX_IMAGE_PIXELS and twice that; the loader refuses at the limit.
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 30 * 60 - 1)
    with pytest.raises(ImageInputError, match=r"exif6\.jpg.*decompression bomb.*1800 pixels"):
        load_rgb_image(files[0])


# ---------------------------------------------------------------- every path, the same pixels


def test_every_path_feeds_the_model_the_same_pixels(tiny_processor, files):
    from diana.hub_cards.space.app import _gallery_items

    reference = tiny_processor(images=files)["pixel_values"]  # (8, 3, H, W)
    height, width = TINY_IMAGE_SIZE
    assert reference.shape == (len(files), 3, height, width)
    expected = tiny_processor(images=[load_rgb_image(p) for p in files])["pixel_values"]
    assert torch.equal(reference, expected)

    for name, collator in _collators(tiny_processor).items():
        for _ in range(2):  # twice: the cache's second draw comes from the kept images
            got = collator(_rows(files))["pixel_values"]
            # The augmentation pipeline resizes with torchvision, the processor through transformers:
            # the same uint8 RGB input, equal up to float rounding.
            torch.testing.assert_close(got, reference, atol=1e-5, rtol=0, msg=name)

    evaluated, loaded = _evaluation_pixels(tiny_processor, files)
    assert loaded.all() and torch.equal(evaluated, reference)

    index = GalleryIndex.build(files, PixelEcho(), tiny_processor, batch_size=3, progress=False)
    assert index.paths == files
    assert torch.equal(index.image_embeds.view(len(files), 3, height, width), reference)

    # The Space shows the ranking as the model saw it (upright, transparency on white).
    result = types.SimpleNamespace(paths=files, scores=[0.0] * len(files))
    shown = [np.asarray(image) for image, _ in _gallery_items(result)]
    assert all(np.array_equal(a, load_rgb_image(p)) for a, p in zip(shown, files))


def test_every_path_refuses_broken_files_naming_them(tiny_processor, files, broken):
    for bad in broken:
        batch = [files[1], bad]
        with pytest.raises(ImageInputError, match=rf"image 1 \({bad}\)"):
            tiny_processor(images=batch)
        for name, collator in _collators(tiny_processor).items():
            with pytest.raises(ImageInputError, match=rf"{bad}, batch row 1"):
                collator(_rows(batch))
        with pytest.raises(ImageInputError, match=rf"{bad}, evaluation row 1"):
            _evaluation_pixels(tiny_processor, batch)
        with pytest.raises(ImageInputError, match=bad):
            GalleryIndex.build(batch, PixelEcho(), tiny_processor, progress=False)


def test_skip_policies_count_broken_files_and_keep_the_rest(tiny_processor, files, broken):
    good = files[:2]
    mixed = [good[0], *broken, good[1]]
    reference = tiny_processor(images=good)["pixel_values"]

    index = GalleryIndex.build(mixed, PixelEcho(), tiny_processor, on_bad_image="skip", progress=False)
    assert index.paths == good and index.add_images(broken, PixelEcho(), tiny_processor, on_bad_image="skip",
                                                    progress=False).skipped_unreadable == broken

    collator = DiaNACollator(tiny_processor, train=False, round_retaining=False, token_masking=0.0,
                             image_augmentation=False, on_bad_image="skip", return_statistics=True)
    batch = collator(_rows(mixed))
    assert torch.equal(batch["pixel_values"], reference) and batch["person_ids"].tolist() == [0, 4]
    assert int(batch["collator_statistics"]["images_skipped"]) == 3 and collator.statistics.samples == 2
    assert [bad in message for bad, message in zip(broken, collator.skipped_images)] == [True] * 3
    with pytest.raises(ImageInputError, match="no image of the batch could be loaded"):
        collator(_rows(broken))

    evaluated, loaded = _evaluation_pixels(tiny_processor, mixed, on_bad_image="skip")
    assert loaded.tolist() == [True, False, False, False, True] and torch.equal(evaluated[loaded], reference)



def test_stage0_collator_skips_and_counts_broken_files_or_names_them(tiny_processor, files, broken):
    """Stage 0 reads MALS-layout rows (whose default check only stats the file): a file that fails there
    is named, or under skip left out with its caption's targets and counted, like the retrieval collator."""
    from diana.training.vision_pretraining import VisionPretrainingCollator

    good = files[:2]
    mixed = [good[0], *broken, good[1]]
    captions = ["a red coat", "x", "y", "z", "a blue bag"]
    rows = [{"image": {"path": p, "bytes": None}, "caption": c, "attributes": [i] * 27}
            for i, (p, c) in enumerate(zip(mixed, captions))]
    vocabulary = ["red", "blue", "bag"]
    strict = VisionPretrainingCollator(tiny_processor, vocabulary, train=False, image_augmentation=False)
    with pytest.raises(ImageInputError, match=rf"{broken[0]}, batch row 1"):
        strict(rows)
    collator = VisionPretrainingCollator(tiny_processor, vocabulary, train=False, image_augmentation=False,
                                         on_bad_image="skip")
    batch = collator(rows)
    assert torch.equal(batch["pixel_values"], tiny_processor(images=good)["pixel_values"])
    assert batch["ngram_targets"].tolist() == [[1, 0, 0], [0, 1, 1]]
    assert batch["label_targets"][:, 0].tolist() == [0, 4]
    assert collator.statistics.images_skipped == 3 and len(collator.skipped_images) == 3

def test_index_command_skips_a_bomb_in_the_gallery_folder(tiny_processor, files, broken, tmp_path):
    import shutil

    from diana.modeling_diana import DiaNAModel
    from diana.processing.search import cli as search_cli
    from tests.helpers import tiny_config

    folder = tmp_path / "model"
    DiaNAModel(tiny_config()).save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for path in [*files[:3], *broken]:
        shutil.copy(path, gallery)
    out = io.StringIO()
    search_cli.main(["index", "--model_name_or_path", str(folder), "--images_dir", str(gallery),
                     "--index_path", str(tmp_path / "i"), "--on_bad_image", "skip", "--num_workers", "2"], out=out)
    text = out.getvalue()
    assert "added 3 image(s)" in text and "skipped 3 unreadable" in text
    assert all(str((gallery / os.path.basename(b)).resolve()) in text for b in broken)


def test_load_rgb_pil_is_the_same_picture(files):
    for path in files:
        image = load_rgb_pil(path)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), load_rgb_image(path))
