"""The Ray executor: the same bytes as the local one, a killed worker, resume, the CLI, a missing Ray.

Every Ray build runs on one local Ray instance (2 CPUs, no dashboard) started once for the module
and compared file by file (sha256, manifest.csv and the card included) with a local build of the
same spec: the phantom backend at 128x128 (130 cases: chunks of 64/64/2), and a tiny random
diffusion model (built by the functions of ``tests/backends/conftest.py``, whose fixtures only
reach tests/backends).
The tests that need Ray are skipped where it is not installed; the missing-Ray message and the
local executor's independence from Ray are checked everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from synthmed.build import BuildError, generate
from synthmed.cli import main as cli_main
from synthmed.testing import output_digests

REPO = Path(__file__).resolve().parents[1]
COUNT = 130
WORKER_CLASS = "ChunkWorker"  # in the process title Ray gives each actor: ray::MapWorker(MapBatches(ChunkWorker))


def spec_text(count: int = COUNT) -> str:
    return textwrap.dedent(f"""\
        spec_version: 1
        name: ray-test
        seed: 11
        count: {count}
        splits: {{train: 0.8, val: 0.1, test: 0.1}}
        image: {{size: 128}}
        findings:
          - finding: no_finding
            weight: 0.4
          - finding: pneumonia
            weight: 0.4
            location: {{right_lower_lobe: 0.5, left_lower_lobe: 0.5}}
            severity: {{mild: 0.5, severe: 0.5}}
          - finding: [pleural_effusion, cardiomegaly]
            weight: 0.2
            severity: {{mild: 0.6, moderate: 0.4}}
        generator: {{backend: phantom}}
        """)


tree = output_digests  # relative path -> sha256 of every file under out, .synthmed/ left out


def assert_same_tree(out: Path, reference: Path) -> None:
    assert (out / "manifest.csv").read_bytes() == (reference / "manifest.csv").read_bytes()
    got, want = tree(out), tree(reference)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    differ = sorted(k for k in want if got[k] != want[k])
    assert not differ, f"{len(differ)} files differ from the local build, e.g. {differ[:5]}"


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module (2 CPUs, no dashboard)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'synthmed[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'synthmed[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "ray-test.yaml"
    path.write_text(spec_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, spec_path) -> Path:
    """The local executor's build of the phantom spec."""
    out = tmp_path_factory.mktemp("local") / "out"
    result = generate(spec_path, out, progress=False)
    assert (result.total, result.written) == (COUNT, COUNT)
    return out


def worker_processes():
    """The Ray actors of the running build: descendants of this process (the local Ray's raylet starts them)."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if WORKER_CLASS in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


# ----------------------------------------------------------------------------- the same bytes

@pytest.mark.slow
def test_ray_build_has_the_bytes_of_the_local_build(ray_local, spec_path, reference, tmp_path, monkeypatch):
    from synthmed.qc import run as qc_run

    read, real = [], qc_run.check_row  # the driver's reads; the workers are other processes
    monkeypatch.setattr(qc_run, "check_row", lambda o, row, *a: read.append(row["case_id"]) or real(o, row, *a))
    out = tmp_path / "ray"
    result = generate(spec_path, out, executor="ray", workers=2, progress=False)
    assert (result.total, result.written, result.reused, result.interrupted) == (COUNT, COUNT, 0, False)
    assert_same_tree(out, reference)  # qc_report.json and report.html included
    # the workers checked their own images; the driver read only the report's thumbnails
    assert result.qc.passed and 0 < len(read) < COUNT // 4
    assert sorted(p.name for p in (out / ".synthmed" / "parts").iterdir()) == [f"part-{k:06d}.csv" for k in range(3)]


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_nothing_is_lost_or_doubled(ray_local, spec_path, reference, tmp_path):
    out = tmp_path / "ray"
    outcome: dict = {}

    def build():
        try:
            outcome["result"] = generate(spec_path, out, executor="ray", workers=2, progress=False)
        except BaseException as e:  # reported below
            outcome["error"] = e

    runner = threading.Thread(target=build)
    runner.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and runner.is_alive() and time.monotonic() < deadline:
        # a worker is inside its first chunk once the first image exists (a chunk takes about 2 s here)
        if (out / "images").is_dir() and any((out / "images").rglob("*.png")):
            victims = worker_processes()
            if victims:
                killed = victims[0]
                os.kill(killed.pid, signal.SIGKILL)
        time.sleep(0.02)
    runner.join(120)
    assert not runner.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert killed is not None, "the build finished before a worker could be killed"
    result = outcome["result"]
    assert (result.total, result.written, result.interrupted) == (COUNT, COUNT, False)
    assert_same_tree(out, reference)  # no temp file of the killed worker is left either


@pytest.mark.slow
def test_diffusion_ray_build_has_the_bytes_of_the_local_build(ray_local, tmp_path_factory, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    helpers_file = REPO / "tests" / "backends" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_synthmed_tiny_models", helpers_file)
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    root = tmp_path_factory.mktemp("tiny-sd-ray")
    text_encoder, tokenizer = helpers.tiny_clip(root / "vocab")
    model = helpers.save_pipeline(root / "model", text_encoder, tokenizer)

    spec_file = tmp_path / "tiny-diffusion.yaml"
    spec_file.write_text(textwrap.dedent(f"""\
        spec_version: 1
        name: tiny-diffusion-ray
        seed: 20261121
        count: 12
        image: {{size: 64, formats: [png]}}
        findings:
          - {{finding: no_finding, weight: 0.4}}
          - {{finding: pneumonia, weight: 0.6, location: {{right_lower_lobe: 0.5, left_lower_lobe: 0.5}}}}
        prompt: {{emphasis: {{finding: 1.3}}, negative: "text, letters, watermark"}}
        generator: {{backend: diffusion, model: "{model}", steps: 2, threads: 1, batch_size: 8}}
        """), encoding="utf-8")
    local = generate(spec_file, tmp_path / "local", progress=False)
    on_ray = generate(spec_file, tmp_path / "ray", executor="ray", workers=2, progress=False)
    assert local.written == on_ray.written == 12
    assert_same_tree(tmp_path / "ray", tmp_path / "local")


def test_a_worker_build_error_reaches_the_caller_as_it_would_locally(ray_local, spec_path, tmp_path):
    # the backend is created in each worker, so its refusal is raised there (a BuildError with exit code 2)
    with pytest.raises(BuildError) as local:
        generate(spec_path, tmp_path / "local", backend="no-such-backend", progress=False)
    with pytest.raises(BuildError) as on_ray:
        generate(spec_path, tmp_path / "ray", backend="no-such-backend", executor="ray", workers=1, progress=False)
    assert (str(on_ray.value), on_ray.value.exit_code) == (str(local.value), 2)
    assert "unknown backend 'no-such-backend'" in str(on_ray.value)


# ----------------------------------------------------------------------------- resume and the CLI

@pytest.mark.slow
def test_cli_executor_ray_resumes_a_partial_run(ray_local, spec_path, reference, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(reference, out)
    parts = out / ".synthmed" / "parts"
    (parts / "part-000000.csv").unlink()          # chunk 0: no part (a run killed inside it)
    victim = next(p for p in sorted((out / "dicom").rglob("*.dcm")) if p.stem >= f"case-{128:07d}")
    victim.unlink()                               # chunk 2: a file lost after its part was written
    (out / "manifest.csv").unlink()
    runner = CliRunner()
    result = runner.invoke(cli_main, ["generate", str(spec_path), "-o", str(out), "--executor", "ray",
                                      "--workers", "2", "--resume", "-q"])
    assert result.exit_code == 0, result.output
    kept = 64  # chunk 1 was whole
    assert f"wrote {COUNT - kept:,} images ({kept:,} kept from before) of {COUNT:,}" in result.output, result.output
    assert_same_tree(out, reference)


# ----------------------------------------------------------------------------- without Ray

def test_missing_ray_names_the_extra_and_touches_nothing(spec_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    out = tmp_path / "out"
    with pytest.raises(BuildError) as excinfo:
        generate(spec_path, out, executor="ray", progress=False)
    assert excinfo.value.exit_code == 2
    assert "pip install 'synthmed[ray]'" in str(excinfo.value)
    assert not out.exists()

    result = CliRunner().invoke(cli_main, ["generate", str(spec_path), "-o", str(out), "--executor", "ray", "-q"])
    assert result.exit_code == 2, result.output
    assert "pip install 'synthmed[ray]'" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("option", [{"workers": 2}, {"ray_address": "ray://head:10001"}, {"gpus_per_worker": 1}])
def test_ray_options_are_refused_by_the_local_executor(spec_path, tmp_path, option):
    with pytest.raises(BuildError) as excinfo:
        generate(spec_path, tmp_path / "out", progress=False, **option)
    assert excinfo.value.exit_code == 2
    assert next(iter(option)) in str(excinfo.value) and "executor='ray'" in str(excinfo.value)


def test_bad_executor_and_a_backend_object_are_refused(spec_path, tmp_path):
    from synthmed.backends.pattern import PatternBackend

    with pytest.raises(BuildError, match="executor must be one of local, ray, got 'dask'"):
        generate(spec_path, tmp_path / "out", executor="dask", progress=False)
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'synthmed[ray]')")
    with pytest.raises(BuildError, match="needs a backend name"):
        generate(spec_path, tmp_path / "out", executor="ray", backend=PatternBackend(128, 128), progress=False)


def test_the_local_executor_does_not_import_ray(spec_path, tmp_path):
    code = textwrap.dedent(f"""\
        import sys
        from synthmed.build import generate
        generate({str(spec_path)!r}, {str(tmp_path / 'out')!r}, backend="pattern", limit=3, progress=False)
        assert "ray" not in sys.modules, "the local executor imported ray"
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------- a killed driver's workers, a wrong address

def test_a_run_waits_for_the_workers_of_a_killed_driver(spec_path, tmp_path, monkeypatch):
    """A SIGKILLed driver's Ray workers write on for a few seconds (until Ray reaps them) while they hold
    .synthmed/workers.lock shared: --resume waits for them, so none of their files or temp files lands in its run;
    if they outlive the wait it stops (exit 1) and removes nothing."""
    import fcntl

    from synthmed.build import run_folder
    from synthmed.build.ray import _hold_workers_lock

    out = tmp_path / "out"
    generate(spec_path, out, progress=False, limit=64, qc=False)
    worker = _hold_workers_lock(out)  # what each ChunkWorker holds while it lives
    assert worker is not None
    monkeypatch.setattr(run_folder, "WORKERS_TIMEOUT_S", 0.5)
    before = tree(out)
    with pytest.raises(BuildError, match="Ray workers of an earlier run on .* are still writing there") as refused:
        generate(spec_path, out, progress=False, resume=True, qc=False)
    assert refused.value.exit_code == 1 and tree(out) == before
    if Path("/proc/locks").is_file():  # Linux: the processes holding the lock are named, to stop only them
        assert f"processes {os.getpid()} on this machine hold" in str(refused.value)
    assert "`ray stop` would also end every other Ray job" in str(refused.value)
    monkeypatch.setattr(run_folder, "WORKERS_TIMEOUT_S", 30.0)
    threading.Timer(0.5, worker.close).start()  # the worker is reaped while the resume waits
    started = time.monotonic()
    result = generate(spec_path, out, progress=False, resume=True, qc=False)
    assert result.written == COUNT - 64 and time.monotonic() - started >= 0.5
    with open(out / ".synthmed" / "workers.lock") as fh:  # and nothing holds it now
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_ray_address_with_nothing_behind_it_is_named_at_once(spec_path, tmp_path, monkeypatch):
    """`--address HOST:PORT` where no Ray answers: ray.init retried it for minutes printing only Ray's warnings; now
    exit 2 at once, naming the address, and the output folder is left as it was (not made)."""
    import socket

    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'synthmed[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'synthmed[ray]')")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process, whatever this module started
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    started = time.monotonic()
    with pytest.raises(BuildError, match=f"could not reach Ray at 127.0.0.1:{port}") as refused:
        generate(spec_path, out, executor="ray", ray_address=f"127.0.0.1:{port}", progress=False)
    assert refused.value.exit_code == 2 and time.monotonic() - started < 30
    assert not out.exists()


def test_an_address_where_another_service_answers_is_named_and_a_real_gcs_passes(ray_local):
    """A port typo that lands on another service: ray.init hung there for minutes; the probe speaks HTTP/2 (gRPC,
    which Ray's GCS and client server use) and refuses what does not answer it, and lets a real GCS through."""
    import socket

    from synthmed.build.ray import _check_reachable

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        conn.recv(100)
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    port = server.getsockname()[1]
    with pytest.raises(BuildError, match=f"127.0.0.1:{port} answers, but not as a Ray cluster") as refused:
        _check_reachable(f"127.0.0.1:{port}")
    assert refused.value.exit_code == 2
    server.close()
    _check_reachable(ray_local.get_runtime_context().gcs_address)  # the module's own Ray: no error


def test_a_ray_resume_holds_the_kept_rows_to_its_workers_settings(ray_local, tmp_path):
    """A run begun locally with a Backend object (its settings are not the spec's) and finished on Ray: the workers
    refuse to mix their images with the kept rows made otherwise, as the local executor does."""
    from synthmed.backends.base import BackendInfo
    from synthmed.backends.pattern import PatternBackend

    spec = spec_text(70).replace("backend: phantom", "backend: pattern").replace("size: 128", "size: 64")

    class Mine(PatternBackend):  # the pattern's images and hash, made with a setting the spec's backend lacks
        def __init__(self):
            super().__init__(64, 64)
            self.info = BackendInfo(name="pattern", model_id=self.info.model_id, model_hash=self.info.model_hash,
                                    settings={**self.info.settings, "steps": 2})

    out = tmp_path / "out"
    generate(spec, out, backend=Mine(), progress=False, qc=False, limit=64)
    with pytest.raises(BuildError, match=r"partly made with other settings .*steps 2 -> None"):
        generate(spec, out, progress=False, qc=False, resume=True, executor="ray", workers=1)
