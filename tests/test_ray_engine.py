"""predict --engine ray on a two-node Ray cluster on this machine (one per module): its run folder
equals the single-host run's (records byte-identical with --batch-size 1, every npz array equal,
overlays byte-identical, error records equal), actors go where the GPUs are, a killed model actor
changes nothing, a unit that kills its actor every time becomes an error record after K tries, and
interrupted runs resume, across engines too."""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.cli import main as cli_main
from detection.engine.image_files import OutputOptions
from detection.engine.predict_methods import ExplainOptions
from detection.engine.predict_run import PredictSettings
from detection.boxes import coco_xywh
from detection.engine.ray_records import records_schema
from detection.engine.ray_run import RaySettings, ray_records, resolve_ray_settings, run_predict_ray
from detection.engine.ray_stages import CONTROL_PREFIX, DEFAULT_MAX_ATTEMPTS
from detection.runfolder.maps_npz import load_maps_npz
from detection.runfolder.run_folder import RunFolder

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Ray gives each model actor OMP_NUM_THREADS = its CPUs (1 here); the reference runs in this
    process on one thread too (float results depend on the thread count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def cluster():
    """Two one-CPU nodes; this module's hooks travel to the workers by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # the S3 test's credentials (moto accepts any): in the environment the nodes' workers inherit
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in credentials}
    os.environ.update(credentials)
    nodes = Cluster(initialize_head=False)
    nodes.add_node(num_cpus=1, include_dashboard=False)
    nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address, log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The demo images, a corrupt file, a dangling symlink and a folder named like an image."""
    root = tmp_path_factory.mktemp("ray")
    images = root / "images"
    shutil.copytree(REPO / "demo" / "images", images)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (images / "dangling.png").symlink_to(root / "missing.png")
    (images / "x.png").mkdir()
    shutil.copy(images / "shapes_2.png", root / "poison.png")
    return {"root": root, "images": images, "poison": root / "poison.png"}


def _options(corpus, out: Path | str, *extra: str, images: Path | str | None = None) -> list[str]:
    return ["predict", str(images or corpus["images"]), *extra, "--model", "demo", "--out", str(out), "--device", "cpu",
            "--precision", "fp32", "--batch-size", "1", "--workers", "0", "--overlays", "--save-attention",
            "--explain", "raw,attn-grad", "--quiet"]


def _settings(corpus, out: Path, *extra_inputs: Path) -> PredictSettings:
    """What `_options` says, for the Python entry point (a hook can be passed there)."""
    return PredictSettings(inputs=[str(corpus["images"]), *map(str, extra_inputs)], out=str(out), model="demo",
                           device="cpu", precision="fp32", batch_size=1, workers=0, progress=False,
                           outputs=OutputOptions(overlays=True, save_attention=True),
                           explain=ExplainOptions(methods=("raw", "attn-grad")))


def _content(path: Path) -> bytes:
    """File bytes; for npz the stored arrays (zip headers carry write timestamps)."""
    if path.suffix != ".npz":
        return path.read_bytes()
    with np.load(path, allow_pickle=False) as archive:
        return b"".join(name.encode() + archive[name].tobytes() for name in sorted(archive.files))


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): _content(p) for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "run.json"}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "out"
    assert cli_main(_options(corpus, out)) == 1  # the corrupt file and the dangling link fail
    snapshot = _snapshot(out)
    errors = [json.loads(line) for line in snapshot["errors.jsonl"].splitlines()]
    assert [e["key"] for e in errors] == ["corrupt", "dangling"]
    assert snapshot["predictions.jsonl"].count(b"\n") == 4
    assert any(name.startswith("attention/attn-grad/") for name in snapshot)
    assert any(name.startswith("overlays/") and name.endswith(".png") for name in snapshot)
    return {"snapshot": snapshot, "out": out}


# -- hooks run in the model actors (fault injection, observation) -------------------------------
def note_keys(folder: str, keys: list[str]) -> None:
    """Leave a file naming the unit's keys and the actor's node."""
    node = ray.get_runtime_context().get_node_id()
    Path(folder, f"{os.getpid()}-{time.time_ns()}").write_text(json.dumps({"keys": keys, "node": node}))


def slow_note_keys(folder: str, seconds: float, keys: list[str]) -> None:
    note_keys(folder, keys)
    time.sleep(seconds)


def exit_on(key: str, keys: list[str]) -> None:
    if key in keys:
        os._exit(1)  # the model process dies, as on a native crash


def _notes(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.iterdir())]


def _model_workers(timeout: float = 120.0) -> list[tuple[int, str]]:
    """(pid, node) of the running run's model actors, once one has started."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        names = [n["name"] if isinstance(n, dict) else n for n in ray.util.list_named_actors()]
        for name in names:
            if name.startswith(CONTROL_PREFIX):
                try:
                    workers = ray.get(ray.get_actor(name).model_workers.remote())
                except Exception:  # noqa: BLE001 - the run ended meanwhile
                    continue
                if workers:
                    return workers
        time.sleep(0.2)
    raise AssertionError("no model actor started")


# -- tests ---------------------------------------------------------------------------------------
def test_defaults_resolve_for_one_machine_and_for_a_cluster() -> None:
    """Embedded (one machine): min(4, cores) actors sharing the cores, decoding in the actors; on a
    cluster: one actor of one CPU, decoding in tasks; what is given is kept."""
    one_machine = resolve_ray_settings(RaySettings(num_cpus=2), embedded=True)
    assert (one_machine.actors, one_machine.cpus_per_actor, one_machine.decode) == (2, 1.0, "actor")
    big = resolve_ray_settings(RaySettings(num_cpus=16), embedded=True)
    assert (big.actors, big.cpus_per_actor, big.decode) == (4, 4.0, "actor")
    gpu = resolve_ray_settings(RaySettings(num_cpus=16, gpus_per_actor=1), embedded=True)
    assert (gpu.actors, gpu.cpus_per_actor) == (1, 16.0)
    cluster = resolve_ray_settings(RaySettings(num_cpus=16), embedded=False)
    assert (cluster.actors, cluster.cpus_per_actor, cluster.decode) == (1, 1.0, "tasks")
    given = resolve_ray_settings(RaySettings(actors=3, cpus_per_actor=0.5, decode="tasks"), embedded=True)
    assert (given.actors, given.cpus_per_actor, given.decode) == (3, 0.5, "tasks")
    with pytest.raises(ValueError, match="decode must be auto, tasks or actor"):
        resolve_ray_settings(RaySettings(decode="gpu"), embedded=True)


@pytest.mark.parametrize("decode", ["tasks", "actor"])
def test_ray_run_equals_single_host_run(cluster, corpus, reference, tmp_path: Path, decode: str) -> None:
    """Decoding in CPU tasks (the cluster's default) or in the model actors (one machine's)."""
    out = tmp_path / "out"
    assert cli_main(_options(corpus, out, "--engine", "ray", "--ray-decode", decode)) == 1
    assert _snapshot(out) == reference["snapshot"]
    ray_info = json.loads((out / "run.json").read_text())
    assert ray_info["settings"]["ray"] == {"address": None, "actors": 1, "gpus_per_actor": 0.0, "cpus_per_actor": 1.0,
                                           "decode": decode}  # a Ray already initialised: a cluster's defaults
    host_info = json.loads((reference["out"] / "run.json").read_text())
    assert ray_info["fingerprint"] == host_info["fingerprint"]  # the engine is not part of it
    assert ray_info["settings"]["engine"] == "ray" and ray_info["status"] == "complete"
    assert ray_info["counts"] == host_info["counts"] == {"images": 4, "errors": 2, "detections": 9}


def test_ray_records_dataset_holds_the_run_records(cluster, corpus, reference, tmp_path: Path) -> None:
    """The Python entry point: a ray.data.Dataset of every input's record, written to Parquet and
    read back with pyarrow: its journal lines those of the single-host run's predictions.jsonl and
    errors.jsonl, its typed columns the same values (boxes and scores at full precision: the
    journal's after its rounding), its map columns every array of the maps npz files (written by
    its actors as it executes)."""
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    ray_records(_settings(corpus, out)).write_parquet(str(tmp_path / "parquet"))
    table = pq.read_table(tmp_path / "parquet")
    assert table.schema.remove_metadata() == records_schema(["raw", "attn-grad"])
    rows = sorted(table.to_pylist(), key=lambda row: row["image_id"])
    names = [n["name"] if isinstance(n, dict) else n for n in ray.util.list_named_actors()]
    assert not [name for name in names if name.startswith(CONTROL_PREFIX)]  # no run's control actor left behind
    snapshot = reference["snapshot"]
    predictions = snapshot["predictions.jsonl"].decode().splitlines()
    errors = snapshot["errors.jsonl"].decode().splitlines()
    assert [row["record"] for row in rows if row["kind"] == "prediction"] == predictions
    assert [row["record"] for row in rows if row["kind"] == "error"] == errors
    for row, line in zip([row for row in rows if row["kind"] == "error"], errors):
        error = json.loads(line)
        assert (row["key"], row["image_id"], row["file"], row["error"]) == \
            (error["key"], error["image_id"], error["file"], error["reason"])
        assert row["boxes"] is row["width"] is row["maps_raw"] is None
    folder = RunFolder(out)
    for row, line in zip([row for row in rows if row["kind"] == "prediction"], predictions):
        record, entries = json.loads(line), json.loads(line)["detections"]
        assert row["error"] is None and row["frame_index"] is None
        assert [row[name] for name in ("key", "image_id", "file", "width", "height")] == \
            [record[name] for name in ("key", "image_id", "file", "width", "height")]
        for column, name in (("labels", "label"), ("category_ids", "category_id"), ("class_names", "class_name"),
                             ("query_index", "query_index")):
            assert row[column] == [entry[name] for entry in entries]
        assert coco_xywh(row["boxes"], decimals=3) == [e["bbox"] for e in entries]
        assert [round(score, 6) for score in row["scores"]] == [entry["score"] for entry in entries]
        for method, path in (("raw", folder.attention_path(row["key"])),
                             ("attn-grad", folder.method_attention_path(row["key"], "attn-grad"))):
            cells, meta = load_maps_npz(path, size=None)
            column = row[f"maps_{method}"]
            assert (row["boxes"], row["scores"]) == (meta["boxes"], meta["scores"])
            assert [column[name] for name in ("grid_size", "feature_stride", "input_size")] == \
                [meta[name] for name in ("valid_feature_size", "feature_stride", "input_size")]
            stored = np.asarray(column["cells"], dtype=np.float32).reshape(-1, *column["grid_size"])
            assert len(stored) == len(entries) and np.array_equal(stored, cells)


def test_gpu_actors_go_only_to_the_node_with_gpus(cluster, corpus, reference, tmp_path: Path) -> None:
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)  # declared, not real: the model runs on the CPU
    try:
        cluster.wait_for_nodes()
        notes = tmp_path / "notes"
        notes.mkdir()
        run_predict_ray(_settings(corpus, tmp_path / "out"),
                        RaySettings(gpus_per_actor=1, unit_hook=functools.partial(note_keys, str(notes))))
        nodes = {note["node"] for note in _notes(notes)}
        assert nodes == {gpu_node.node_id}
        assert _snapshot(tmp_path / "out") == reference["snapshot"]
    finally:
        cluster.remove_node(gpu_node)


def test_killed_model_actor_is_retried_and_changes_nothing(cluster, corpus, reference, tmp_path: Path) -> None:
    out = tmp_path / "out"
    notes = tmp_path / "notes"
    notes.mkdir()
    killed: list[int] = []

    def kill_one_actor() -> None:
        pid, _ = _model_workers()[0]
        while len(list(notes.iterdir())) < 2:  # mid-run: the second image is in the model
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_one_actor, daemon=True)
    killer.start()
    run_predict_ray(_settings(corpus, out), RaySettings(unit_hook=functools.partial(slow_note_keys, str(notes), 1.0)))
    killer.join(timeout=10)
    assert killed, "the actor was not killed"
    processed = [note["keys"] for note in _notes(notes)]
    assert len(processed) > 4  # the unit in flight ran again on the restarted actor
    assert _snapshot(out) == reference["snapshot"]


@pytest.mark.parametrize("decode, units_per_block", [("tasks", 1), ("actor", 5)])
def test_poison_image_becomes_an_error_record_after_k_tries(cluster, corpus, reference, tmp_path: Path,
                                                            decode: str, units_per_block: int) -> None:
    """With five units per block (all), the units before the poison one run again with each retry of
    their block, and are not counted as dying: only the poison image becomes an error."""
    out = tmp_path / "out"
    run_predict_ray(_settings(corpus, out, corpus["poison"]),
                    RaySettings(unit_hook=functools.partial(exit_on, "poison"), decode=decode,
                                units_per_block=units_per_block))
    snapshot = _snapshot(out)
    errors = [json.loads(line) for line in snapshot["errors.jsonl"].splitlines()]
    assert [e["key"] for e in errors] == ["corrupt", "dangling", "poison"]
    assert f"died on each of {DEFAULT_MAX_ATTEMPTS} tries" in errors[-1]["reason"]
    assert errors[-1]["file"] == str(corpus["poison"])
    assert snapshot["predictions.jsonl"] == reference["snapshot"]["predictions.jsonl"]


def test_image_that_kills_its_decoding_task_becomes_an_error_record_after_k_tries(cluster, corpus, reference,
                                                                                 tmp_path: Path) -> None:
    """Ray Data retries a decoding task whose process dies without end: the run's control bounds
    it. All five units in one block: the four decoded before the poison one run again with each
    retry and are not counted."""
    out = tmp_path / "out"
    run_predict_ray(_settings(corpus, out, corpus["poison"]),
                    RaySettings(decode="tasks", decode_hook=functools.partial(exit_on, "poison"), units_per_block=5))
    snapshot = _snapshot(out)
    errors = [json.loads(line) for line in snapshot["errors.jsonl"].splitlines()]
    assert [e["key"] for e in errors] == ["corrupt", "dangling", "poison"]
    assert f"the decoding process died on each of {DEFAULT_MAX_ATTEMPTS} tries" in errors[-1]["reason"]
    assert snapshot["predictions.jsonl"] == reference["snapshot"]["predictions.jsonl"]


def test_video_on_ray_equals_single_host(cluster, tmp_path: Path) -> None:
    """A video is one unit (all its sampled frames): its frames' records and files equal the
    single-host run's, decoding in tasks or in the actor."""
    import cv2

    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    if not writer.isOpened():
        pytest.skip("OpenCV cannot write MJPG video here")
    frame = cv2.imread(str(REPO / "demo" / "images" / "shapes_2.png"))
    for index in range(7):
        writer.write(cv2.resize(np.roll(frame, 9 * index, axis=1), (160, 120)))
    writer.release()
    options = ["predict", str(video), "--video-stride", "2", "--model", "demo", "--device", "cpu", "--precision",
               "fp32", "--batch-size", "2", "--workers", "0", "--save-attention", "--explain", "attn-grad", "--quiet"]
    assert cli_main([*options, "--out", str(tmp_path / "host")]) == 0
    reference = _snapshot(tmp_path / "host")
    assert reference["predictions.jsonl"].count(b"\n") == 4  # frames 0, 2, 4, 6
    for decode in ("tasks", "actor"):
        out = tmp_path / decode
        assert cli_main([*options, "--out", str(out), "--engine", "ray", "--ray-decode", decode]) == 0
        assert _snapshot(out) == reference


def _signal_driver(command: list[str], journal: Path, signum: int, lines: int) -> tuple[int, str]:
    """Run the driver in a subprocess, send `signum` once `lines` records are journalled."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 200
    while time.time() < deadline and driver.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= lines:
            driver.send_signal(signum)
            break
        time.sleep(0.02)
    _, stderr = driver.communicate(timeout=120)
    return driver.returncode, stderr.decode()


def _driver_command(corpus, cluster, out: Path) -> list[str]:
    return [sys.executable, "-m", "detection.cli", *_options(corpus, out, "--engine", "ray", "--ray-address",
                                                             cluster.address)]


def test_sigterm_stops_the_driver_after_the_record_in_hand(cluster, corpus, tmp_path: Path) -> None:
    """Exit 3, status "interrupted", complete journal lines, the lock released (ray.init's own SIGTERM
    handler, which aborts the process, is overridden while the run goes)."""
    out = tmp_path / "out"
    status, stderr = _signal_driver(_driver_command(corpus, cluster, out), out / "predictions.jsonl", signal.SIGTERM, 1)
    assert status == 3, stderr[-3000:]
    assert "interrupted; rerun the same command to resume" in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert (out / "predictions.jsonl").read_bytes().endswith(b"\n") and not (out / ".lock").exists()


def test_killed_driver_rerun_resumes_without_recomputing(cluster, corpus, reference, tmp_path: Path) -> None:
    out = tmp_path / "out"
    journal = out / "predictions.jsonl"
    status, stderr = _signal_driver(_driver_command(corpus, cluster, out), journal, signal.SIGKILL, 1)
    assert status == -signal.SIGKILL, stderr[-3000:]
    done = {json.loads(line)["key"] for line in journal.read_bytes().splitlines()}
    assert 1 <= len(done) < 4 and not (out / "detections.json").exists()

    notes = tmp_path / "notes"
    notes.mkdir()
    run_predict_ray(_settings(corpus, out), RaySettings(unit_hook=functools.partial(note_keys, str(notes))))
    rerun = {key for note in _notes(notes) for key in note["keys"]}
    assert rerun and not rerun & done  # finished images were not computed again
    assert _snapshot(out) == reference["snapshot"]


def test_folder_started_single_host_finishes_on_ray(cluster, corpus, reference, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    lines = (out / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    (out / "predictions.jsonl").write_bytes(b"".join(lines[:2]))  # as if stopped after two images
    (out / "detections.json").unlink()
    done = {json.loads(line)["key"] for line in lines[:2]}
    notes = tmp_path / "notes"
    notes.mkdir()
    run_predict_ray(_settings(corpus, out), RaySettings(unit_hook=functools.partial(note_keys, str(notes))))
    rerun = {key for note in _notes(notes) for key in note["keys"]}
    assert rerun == {json.loads(line)["key"] for line in lines[2:]} and not rerun & done
    assert _snapshot(out) == reference["snapshot"]


def test_engine_ray_without_ray_exits_2_naming_the_extra(corpus, tmp_path: Path, monkeypatch, capsys) -> None:
    import detection.cli.ray_options

    monkeypatch.setattr(detection.cli.ray_options, "ray_available", lambda: False)
    assert cli_main(_options(corpus, tmp_path / "out", "--engine", "ray")) == 2
    assert "pip install 'detection[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_s3_bucket_in_and_out_equals_the_local_run(cluster, corpus, tmp_path: Path) -> None:
    """Images read from a bucket, the run written to a bucket (moto's S3 server): once downloaded,
    the folder equals the single-host run over the same files (file names aside), and `report`
    reads it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="photos")
        local = tmp_path / "images"  # what the bucket holds, as a local folder for the reference
        local.mkdir()
        for path in sorted(corpus["images"].iterdir()):
            if path.is_file() and not path.is_symlink():
                s3.upload_file(str(path), "photos", f"images/{path.name}")
                shutil.copy(path, local / path.name)
        query = f"?endpoint_override={host}:{port}&scheme=http"
        assert cli_main(_options(corpus, tmp_path / "reference", images=local)) == 1
        assert cli_main(_options(corpus, f"s3://photos/runs/one{query}", "--engine", "ray",
                                 images=f"s3://photos/images{query}")) == 1

        copy = tmp_path / "copy"  # the bucket's run folder, downloaded
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="photos", Prefix="runs/one/"):
            for entry in page["Contents"]:
                target = copy / entry["Key"][len("runs/one/"):]
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file("photos", entry["Key"], str(target))
    finally:
        server.stop()
    expected = _snapshot(tmp_path / "reference")
    got = {name: content.replace(b"s3://photos/images", str(local).encode()) for name, content in _snapshot(copy).items()}
    assert got == expected
    assert b"s3://photos/images/shapes_1.png" in _snapshot(copy)["predictions.jsonl"]
    assert json.loads((copy / "run.json").read_text())["status"] == "complete"
    assert cli_main(["report", str(copy), "--out", str(tmp_path / "report")]) == 0
