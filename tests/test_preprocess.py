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
