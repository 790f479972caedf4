"""Old training names keep working for one release, with a DeprecationWarning."""
from __future__ import annotations

import pytest
import torch

from detection.data.synthetic import SynthConfig, generate_dataset
from detection.data.transforms import EvalTransform
from detection.models import digest
from detection.models.registry import build_model, load_config
from detection.runtime.device import autocast
from detection.train import config, evaluation, export, model_setup, optim


@pytest.mark.parametrize("old, new", [
    ("evaluate", evaluation.evaluate_during_training), ("weights_digest", digest.weights_digest),
    ("load_train_config", config.load_train_config), ("apply_override", config.apply_override),
    ("build_training_model", model_setup.build_training_model), ("inference_copy", export.inference_copy),
    ("lr_factor", optim.lr_factor),
])
def test_train_loop_names_warn_and_forward(old, new):
    from detection.train import loop

    with pytest.warns(DeprecationWarning, match=f"train.loop.{old} is deprecated"):
        assert getattr(loop, old) is new


def test_old_names_still_work(tmp_path):
    from detection.train import loop

    data = tmp_path / "data"
    generate_dataset(data, train=0, val=2, seed=1, config=SynthConfig(image_size=48, max_objects=2))
    from detection.data.coco import CocoDetection

    dataset = CocoDetection(data / "val", data / "annotations/instances_val.json", transform=EvalTransform(48, 64))
    torch.manual_seed(0)
    model = build_model(load_config("detr-tiny").replace(
        num_classes=dataset.label_map.num_classes, class_names=list(dataset.label_map.class_names),
        category_ids=list(dataset.label_map.category_ids), min_size=48, max_size=64))
    with pytest.warns(DeprecationWarning):
        old = loop.evaluate(model, dataset, torch.device("cpu"), batch_size=2)
    assert old == evaluation.evaluate_during_training(model, dataset, torch.device("cpu"), batch_size=2)
    assert old["num_images"] == 2 and set(old) >= {"AP", "AP50", "pointing_game"}
    with pytest.warns(DeprecationWarning):
        assert loop.weights_digest(model) == digest.weights_digest(model)
    with pytest.warns(DeprecationWarning, match="runtime.device.autocast"):
        context = loop.autocast_context(torch.device("cpu"), "bf16")
    assert type(context) is type(autocast(torch.device("cpu"), "bf16", training=True))
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="fp16 autocast needs CUDA"):
        loop.autocast_context(torch.device("cpu"), "fp16")


def test_old_distributed_helpers_warn_and_answer_for_one_process():
    from detection.train import distributed

    with pytest.warns(DeprecationWarning, match="init_distributed"):
        assert distributed.init_from_env("cpu") == (0, 1, 0)
    for name, expected in (("rank", 0), ("world_size", 1), ("is_main", True), ("is_distributed", False),
                           ("barrier", None), ("cleanup", None)):
        with pytest.warns(DeprecationWarning, match=f"distributed.{name} is deprecated"):
            assert getattr(distributed, name)() == expected
