"""What a newcomer reads first: readable reprs, `dir(detection)`, `detr-attn --version`, and
counts in the right number in the summary line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import detection
from detection.api import Explanation
from detection.cli import main
from detection.structures import Detections
from detection.engine.image_files import OutputOptions
from detection.engine import output_size
from detection.engine.output_size import OverlayProjection
from detection.runfolder.run_folder import RunFolder
from detection.text import plural, size

REPO = Path(__file__).resolve().parents[1]


def _detections(count: int) -> Detections:
    return Detections((165, 206), boxes=torch.tensor([[10.0 + k, 20.0, 50.25, 60.0] for k in range(count)]),
                      scores=torch.linspace(0.99, 0.5, count), labels=torch.zeros(count, dtype=torch.int64),
                      query_index=torch.arange(count) + 3, class_names=["circle"] * count)


def test_detections_repr_is_a_short_table():
    lines = repr(_detections(2)).splitlines()
    assert lines == ["Detections(2 in a 206x165 image; fields: boxes, scores, labels, query_index, class_names)",
                     "    0  circle           0.990  [10.0, 20.0, 50.2, 60.0]  query 3",
                     "    1  circle           0.500  [11.0, 20.0, 50.2, 60.0]  query 4"]
    many = repr(_detections(13)).splitlines()
    assert len(many) == 12 and many[-1] == "  ... 3 more"
    assert repr(Detections.empty((10, 20))) == (
        "Detections(0 in a 20x10 image; fields: boxes, scores, labels, query_index, class_names)")


def test_explanation_repr_names_image_model_method_and_lists_detections():
    explanation = Explanation("a.png", image=None, detections=_detections(1), method="raw", model="demo")
    assert repr(explanation).splitlines() == [
        "Explanation(a.png: 206x165, model demo, method raw, 1 detection)",
        "    0  circle           0.990  [10.0, 20.0, 50.2, 60.0]  query 3"]
    failed = Explanation("b.png", error="b.png: not a decodable image")
    assert repr(failed) == "Explanation(b.png: not explained: b.png: not a decodable image)"


def test_explain_is_visible_to_dir_and_tab_completion():
    names = dir(detection)
    assert {"explain", "Explanation", "load_model", "Detections", "__version__"} <= set(names)


def test_version_flag():
    done = subprocess.run([sys.executable, "-m", "detection.cli", "--version"], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == f"detr-attn {detection.__version__}"


def test_counts_in_the_right_number():
    assert [plural(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert plural(1, "error") == "1 error" and plural(3, "query", "queries") == "3 queries"


def test_predict_summary_line_says_one_image(tmp_path, capsys):
    status = main(["predict", str(REPO / "demo" / "images" / "shapes_1.png"), "--model", "demo", "--out",
                   str(tmp_path / "run"), "--device", "cpu", "--workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert status == 0
    written = sum(p.stat().st_size for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert f"detr-attn predict: 1 image, 2 detections, 0 errors -> {tmp_path / 'run'} ({size(written)})" in err


def test_sizes_read_as_people_read_them():
    assert [size(n) for n in (0, 512, 1023, 1024, 2_500_000, 111_000_000, 1_300_000_000, 5 * 2**40)] == \
        ["0 B", "512 B", "1023 B", "1.0 KB", "2.4 MB", "106 MB", "1.2 GB", "5.0 TB"]


def test_a_run_projected_above_the_limit_says_so_and_how_to_shrink_it(tmp_path, caplog):
    folder = RunFolder(tmp_path)
    for key, sizes in (("a", (300, 200)), ("b", (500, 0))):  # combined + per-detection overlays
        folder.overlay_path(key, "raw", "png").parent.mkdir(parents=True, exist_ok=True)
        folder.overlay_path(key, "raw", "png").write_bytes(b"x" * sizes[0])
        folder.detection_overlay_path(key, 0, "drise", "png").parent.mkdir(parents=True, exist_ok=True)
        folder.detection_overlay_path(key, 0, "drise", "png").write_bytes(b"x" * sizes[1])
    options = OutputOptions(overlays=True, overlay_size=1600)
    quiet = OverlayProjection(folder, planned_images=4, options=options, limit=2000, sample=2)
    loud = OverlayProjection(folder, planned_images=5, options=options, limit=2000, sample=2)
    with caplog.at_level("WARNING"):
        for projection in (quiet, loud):
            projection.add("a")
            assert projection.warning is None  # one image is not the sample yet
            projection.add("b")
    assert quiet.warning is None  # 500 B per image x 4 = 2000 B: not above the limit
    assert loud.warning == ("the first 2 images wrote 500 B of overlays each: the 5 images of this run would "
                            "write about 2.4 KB; to write less, rerun with --overlay-size 800 (now 1600) or "
                            "--format jpg (and --overwrite)")
    assert caplog.messages == [loud.warning]
    without_overlays = OverlayProjection(folder, 5, OutputOptions(overlays=False), limit=0, sample=1)
    without_overlays.add("a")
    assert without_overlays.warning is None and without_overlays.measured == []


def test_predict_warns_from_its_first_images(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(output_size, "OVERLAY_WARNING_BYTES", 1000)
    with caplog.at_level("WARNING"):
        status = main(["predict", str(REPO / "demo" / "images"), "--model", "demo", "--out", str(tmp_path / "run"),
                       "--device", "cpu", "--workers", "0", "--quiet", "--overlays", "--format", "jpg"])
    assert status == 0
    warnings = [m for m in caplog.messages if "of overlays each" in m]
    images = len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines())
    assert len(warnings) == 1 and warnings[0].startswith(f"the first {images} images wrote ")
    assert f"the {images} images of this run would write about" in warnings[0]
    assert warnings[0].endswith("rerun with --overlay-size 800 (now 1600) (and --overwrite)")  # already jpg


def test_no_image_to_run_on_is_a_usage_error_that_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    for source, reason in ((tmp_path / "empty", "folder contains no image or video files"),
                           (tmp_path / "nothing.png", "file not found"),
                           (tmp_path / "*.jpg", "glob pattern matched no image or video files")):
        status = main(["predict", str(source), "--model", "demo", "--out", str(out), "--device", "cpu", "--quiet"])
        err = " ".join(capsys.readouterr().err.split())
        assert status == 2 and not out.exists()
        assert f"no image to run on: {source}: {reason}" in err


def test_synth_refuses_a_folder_with_files_and_overwrite_replaces_its_data(tmp_path, capsys):
    out = tmp_path / "data"
    common = ["synth", "--out", str(out), "--val", "0", "--image-size", "48", "--no-progress"]
    assert main(common + ["--train", "3"]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(common + ["--train", "1"]) == 2
    assert "is not an empty folder" in capsys.readouterr().out
    assert len(list((out / "train").glob("*.png"))) == 3  # untouched
    assert main(common + ["--train", "1", "--overwrite"]) == 0
    assert len(list((out / "train").glob("*.png"))) == 1 and (out / "notes.txt").read_text() == "mine"


def test_a_method_the_family_lacks_is_refused_before_any_work_with_one_message(tmp_path, monkeypatch, capsys):
    """API and CLI alike: refused when asked, naming the family and the methods that apply; the
    model never runs."""
    import numpy as np
    import pytest

    pytest.importorskip("transformers")
    from test_hf_equivalence import hf_folder

    from detection.attention.methods import MethodNotApplicable
    from detection.engine.predictor import Predictor

    folder = hf_folder("rt_detr", tmp_path / "rt_detr")

    def never(*args, **kwargs):
        raise AssertionError("the model ran before the refusal")

    monkeypatch.setattr(Predictor, "predict_tensors", never)
    expected = ("explanation method 'rollout' does not apply to the RT-DETR family: rollout needs dense attention "
                "(this family's cross-attention is sampled points); methods that apply: raw, attn-grad, drise, in-box")
    with pytest.raises(MethodNotApplicable) as error:
        detection.explain(np.zeros((64, 64, 3), np.uint8), model=str(folder), method="rollout", device="cpu")
    assert str(error.value) == expected
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    status = main(["predict", str(image), "--model", str(folder), "--out", str(tmp_path / "run"), "--device", "cpu",
                   "--explain", "raw,rollout", "--quiet"])
    assert status == 2 and not (tmp_path / "run").exists()
    assert expected in " ".join(capsys.readouterr().err.split())


def test_every_help_shows_defaults_and_examples_and_what_model_accepts():
    from detection.cli import VERBS, verb_parser

    for verb in VERBS:
        _, parser = verb_parser(verb)
        text = " ".join(parser.format_help().split())
        assert "examples: detr-attn " + verb in text, verb
    predict = " ".join(verb_parser("predict")[1].format_help().split())
    for shown in ("--score-threshold SCORE_THRESHOLD (default: 0.7)", "--batch-size BATCH_SIZE (default: 4)",
                  "(default: demo)", "hf:ORG/NAME[@REVISION]", "a Hugging Face folder", "--format {png,jpg} (default: png)"):
        assert shown in predict, shown
    assert "hf:ORG/NAME[@REVISION]" in " ".join(verb_parser("eval")[1].format_help().split())


def test_one_flag_vocabulary_with_the_old_spellings_hidden():
    from detection.cli import verb_parser

    evaluation_args = ["--model", "demo", "--ann", "a.json", "--images", "i", "--out", "o"]
    for verb, old in (("synth", ["--out", "x", "--no-progress"]), ("eval", evaluation_args + ["--no-progress"]),
                      ("predict", ["x.png", "--out", "o", "--no-progress"])):
        parser = verb_parser(verb)[1]
        assert parser.parse_args(old).quiet is True
        assert "--no-progress" not in parser.format_help() and "--quiet" in parser.format_help()
    evaluation = verb_parser("eval")[1]
    assert evaluation.parse_args(evaluation_args + ["--num-workers", "3"]).workers == 3
    assert evaluation.parse_args(evaluation_args + ["--workers", "2"]).workers == 2
    assert "--num-workers" not in evaluation.format_help()
    assert verb_parser("predict")[1].parse_args(["x.png", "--out", "o", "--num-workers", "1"]).workers == 1


def test_no_progress_bar_noise_when_stderr_is_not_a_terminal(tmp_path):
    done = subprocess.run([sys.executable, "-m", "detection.cli", "synth", "--out", str(tmp_path / "d"), "--train",
                           "3", "--val", "1", "--image-size", "48"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "\r" not in done.stderr and "synth train" not in done.stderr
    assert done.stdout.strip() == f"wrote 3 train + 1 val images to {tmp_path / 'd'}"
