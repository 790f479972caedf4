import numpy as np
import pytest
import torch

from detection.data.preprocess import image_to_input, pad_batch, resized_size


@pytest.mark.parametrize(
    "size,expected",
    [
        ((480, 640), (800, 1066)),  # COCO-like landscape: short side 800
        ((640, 480), (1066, 800)),
        # very wide: short side shrinks to round(1333*400/2000)=267; the authors' int() rounding
        # then gives 1335, slightly above max_size, and we keep their exact behaviour.
        ((400, 2000), (267, 1335)),
        ((800, 1000), (800, 1000)),  # already the right size: untouched
    ],
)
def test_resized_size_matches_detr_rule(size, expected):
    assert resized_size(*size, min_size=800, max_size=1333) == expected


def test_image_to_input_range_and_layout():
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    image[..., 0] = 255  # pure red
    tensor = image_to_input(image, min_size=20, max_size=None)
    assert tensor.shape == (3, 20, 30) and tensor.dtype == torch.float32
    assert tensor[0].min() == 1.0 and tensor[1:].max() == 0.0


def test_image_to_input_rejects_non_rgb():
    with pytest.raises(ValueError, match="uint8"):
        image_to_input(np.zeros((4, 4), dtype=np.uint8), 4, None)


def test_pad_batch_places_images_top_left_and_marks_padding():
    a = torch.full((3, 4, 6), 0.5)
    b = torch.full((3, 5, 2), 0.25)
    batch, mask = pad_batch([a, b])
    assert batch.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6)
    assert torch.equal(batch[0, :, :4, :6], a) and batch[0, :, 4:].abs().sum() == 0
    assert torch.equal(batch[1, :, :5, :2], b) and batch[1, :, :, 2:].abs().sum() == 0
    assert mask[0].sum() == 5 * 6 - 4 * 6 and not mask[0, :4].any()
    assert mask[1].sum() == 5 * 6 - 5 * 2 and mask[1, :, 2:].all()


def test_image_to_input_accepts_read_only_arrays_without_warning():
    import warnings

    image = np.full((6, 8, 3), 51, dtype=np.uint8)
    image.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = image_to_input(image, min_size=6, max_size=None)
    assert torch.allclose(tensor, torch.full((3, 6, 8), 0.2))


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("size", [(480, 640), (640, 480), (400, 2000), (800, 1000), (37, 53), (1500, 900)])
def test_spec_equals_the_min_max_call_bit_for_bit(size):
    from detection.models.contract import PreprocessSpec

    spec = PreprocessSpec.shortest_edge(96, 160)
    image = _photo(*size)
    assert resized_size(*size, spec) == resized_size(*size, 96, 160)
    assert torch.equal(image_to_input(image, spec), image_to_input(image, 96, 160))
    assert torch.equal(image_to_input(image, spec), image_to_input(image, min_size=96, max_size=160))


def test_longest_edge_and_fixed_sizes():
    from detection.models.contract import PreprocessSpec

    longest = PreprocessSpec.longest_edge(640)
    assert resized_size(480, 1280, longest) == (240, 640)
    assert resized_size(1001, 300, longest) == (640, 192)  # 300 * 640 / 1001 = 191.8
    assert resized_size(100, 50, longest) == (640, 320)    # the longer side becomes 640 either way
    fixed = PreprocessSpec.fixed(64, 32)
    assert resized_size(480, 1280, fixed) == (64, 32)
    assert image_to_input(_photo(20, 30), fixed).shape == (3, 64, 32)


def test_spec_normalisation_and_antialias():
    from detection.models.contract import PreprocessSpec

    image = _photo(40, 60)
    plain = image_to_input(image, PreprocessSpec.fixed(40, 60))
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.25, 2.0)
    normalised = image_to_input(image, PreprocessSpec.fixed(40, 60, mean=mean, std=std))
    expected = (plain - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.equal(normalised, expected)
    # a 1-pixel checkerboard shrunk 3x: plain bilinear samples source pixels (3i + 1, 3j + 1)
    # exactly, so the output is a 0/1 checkerboard; the low-pass filter averages it to grey
    board = np.zeros((48, 48, 3), dtype=np.uint8)
    board[::2, ::2] = board[1::2, 1::2] = 255
    smooth = image_to_input(board, PreprocessSpec.fixed(16, 16, antialias=True))
    sharp = image_to_input(board, PreprocessSpec.fixed(16, 16))
    assert smooth.shape == sharp.shape == (3, 16, 16)
    assert set(sharp.unique().tolist()) == {0.0, 1.0}
    assert (smooth - 0.5).abs().max() < 0.1


def test_invalid_specs_and_mixed_arguments():
    from detection.models.contract import PreprocessSpec

    with pytest.raises(ValueError, match="min_size"):
        PreprocessSpec(resize="shortest_edge", min_size=0)
    with pytest.raises(ValueError, match="fixed_size"):
        PreprocessSpec(resize="fixed")
    with pytest.raises(ValueError, match="both mean and std"):
        PreprocessSpec(mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessSpec(interpolation="lanczos")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        resized_size(10, 10, PreprocessSpec(), 1333)


def test_pad_batch_size_divisibility():
    batch, mask = pad_batch([torch.ones(3, 5, 7), torch.ones(3, 9, 2)], size_divisibility=4)
    assert batch.shape == (2, 3, 12, 8) and mask.shape == (2, 12, 8)
    assert mask[0].sum() == 12 * 8 - 5 * 7 and not mask[0, :5, :7].any()
    assert batch[1, :, 9:].abs().sum() == 0 and mask[1, 9:].all()
    same, _ = pad_batch([torch.ones(3, 5, 7)], size_divisibility=1)
    assert same.shape == (1, 3, 5, 7)
